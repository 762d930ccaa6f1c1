"""attnscope's Jinja renderer (text/jinja/) against Python's jinja2 configured as transformers
configures it (tests/tools/chat_reference.py): the chat templates of 166 real models on a set of
conversations, and a corpus of small templates for the language's corners. Byte-identical text,
the same raise_exception message, an error where jinja2 errs."""
import collections
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, binary, need_reference

sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))

FIXTURE = os.environ.get("ATTNSCOPE_FIXTURES", os.path.join(ROOT, "..", "shared", "fixtures"))
TEMPLATES = os.path.join(FIXTURE, "chat_templates", "templates.json")


def reference():
    try:
        import chat_reference
    except ImportError:
        need_reference(False, "python3-jinja2 is not installed (apt-get install python3-jinja2)")
    return chat_reference


def render_cpp(cases):
    """[(template, variables)] -> [result dict] through attnscope-chat-template."""
    inp = "".join(json.dumps({"template": t, "variables": v}) + "\n" for t, v in cases)
    p = subprocess.run([binary("attnscope-chat-template")], input=inp, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = [json.loads(line) for line in p.stdout.split("\n") if line]
    assert len(out) == len(cases)
    return out


def agrees(kind, want, got):
    if kind == "text":
        return got.get("text") == want
    if kind == "raised":
        return got.get("error") == "FAILED_PRECONDITION" and got.get("message") == want
    return "error" in got


def templates_of(entry):
    t = entry["chat_template"]
    if isinstance(t, list):
        return [(x["name"], x["template"]) for x in t]
    if isinstance(t, dict):
        return list(t.items())
    return [("default", t)]


def test_real_chat_templates_render_byte_identical():
    ref = reference()
    need_reference(os.path.exists(TEMPLATES), f"chat template fixture absent ({TEMPLATES}); see ../shared/fixtures/README.md")
    with open(TEMPLATES) as f:
        models = json.load(f)
    env = ref.environment()
    cases, expected = [], []
    for model, entry in models.items():
        for tname, template in templates_of(entry):
            for cname, conv, extra in ref.CASES:
                v = ref.variables(entry, conv, extra)
                cases.append((template, v))
                expected.append((model, tname, cname) + ref.render(env, template, v))
    got = render_cpp(cases)
    wrong = [(e[:3], e[3], str(e[4])[:200], str(g)[:200]) for e, g in zip(expected, got) if not agrees(e[3], e[4], g)]
    kinds = collections.Counter(e[3] for e in expected)
    templates = {(e[0], e[1]) for e in expected}
    fully = {(e[0], e[1]) for e in expected} - {w[0][:2] for w in wrong}
    print(f"{len(models)} models, {len(templates)} templates, {len(cases)} renders: {kinds['text']} texts, "
          f"{kinds['raised']} raise_exception, {kinds['error']} jinja2 errors; {len(fully)} templates agree on "
          f"every case")
    assert not wrong, wrong[:5]


# Small templates for the corners: (template, variables). Each must agree with jinja2.
CORNERS = [
    ("{{ 1e16 }} {{ 0.1 + 0.2 }} {{ 1/2 }} {{ 7//2 }} {{ -7 % 3 }} {{ 2**10 }} {{ 10/5 }} {{ -7 // 2 }}", {}),
    ("{{ 3.0 }} {{ 1e-5 }} {{ 123456789.123 }} {{ 1.5e300 }} {{ -0.0 }} {{ 0.0001 }} {{ 1e15 }} {{ 12e15 }}", {}),
    ("{{ [1, 'a', none, true, 1.5, {'k': (1, 2)}, (3,), ()] }}", {}),
    ("{{ \"it's\" }} {{ ['it\\'s', 'say \"x\"', 'both \\' \"'] }} {{ ['tab\\there', 'nl\\n', '\\x01'] }}", {}),
    ("{{ 'abc'[::-1] }} {{ 'héllo'[1] }} {{ 'héllo'|length }} {{ [1,2,3][-1] }} {{ 'abcdef'[1:4] }} {{ 'abcdef'[-2:] }}", {}),
    ("{{ [0,1,2,3,4,5][::2] }} {{ [0,1,2,3,4,5][4:1:-1] }} {{ 'abc'[5] }}|{{ [1][3] }}|{{ 'abcdef'[:-10] }}", {}),
    ("{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(sort_keys=true) }}", {"x": {"b": [1, 2.0, None, True, "é\n\""], "a": {}}}),
    ("{{ x|tojson(separators=(',', ':')) }} {{ 'a\u2028b'|tojson }} {{ 1e100|tojson }}", {"x": {"k": [1, "v"]}}),
    ("{{ 'a' ~ 1 ~ none ~ undefined_thing }} {{ 'x' * 3 }} {{ [1] + [2] }} {{ 3 * 'ab' if false else 'no' }}", {}),
    ("{{ 'a b  c'.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a b c'.split(' ', 1) }} {{ ' a '.strip() }}|{{ 'xxaxx'.strip('x') }}", {}),
    ("{{ 'Hello world-foo (bar)'|title }} {{ 'hello wORLD'.title() }} {{ \"they're bill's\".title() }} {{ 'ÉCOLE été'|lower }}", {}),
    ("{{ 'hello'|capitalize }} {{ 'HELLO world'.capitalize() }} {{ 'ß'|upper }} {{ 'abc'|upper }} {{ 'ﬁne'.upper() }}", {}),
    ("{{ 'ΟΔΟΣ ΟΔΟΣ. Σ'|lower }} {{ 'İ'|lower|length }} {{ 'ÅNGSTRÖM'.lower() }}", {}),
    ("{{ messages|selectattr('role', 'equalto', 'user')|list }} {{ messages|rejectattr('role', 'eq', 'user')|map(attribute='role')|list }}",
     {"messages": [{"role": "user"}, {"role": "system"}]}),
    ("{{ messages|map(attribute='content')|join(', ') }} {{ [3,1,2]|sort }} {{ ['b','A','c']|sort }} {{ [1,2,3]|sum }}",
     {"messages": [{"content": "a"}, {"content": "b"}]}),
    ("{{ true == 1 }} {{ 1 == 1.0 }} {{ 'a' in 'cat' }} {{ none is none }} {{ x is mapping }} {{ 2 in [1,2] }} {{ 'k' in x }}", {"x": {"k": 1}}),
    ("{% for a, b in d.items() %}{{ a }}={{ b }};{% endfor %}{{ d|items|list }} {{ d.keys()|list }} {{ d.get('z', 5) }}", {"d": {"y": 2, "x": 1}}),
    ("{% for i in [1,2,3] %}{% if i == 1 %}{% set x = 'a' %}{% endif %}[{{ x }}]{% endfor %}{{ x }}", {}),
    ("{% set x = 1 %}{% macro m() %}{{ x }}{% endmacro %}{% set x = 2 %}{{ m() }}", {}),
    ("{% set ns = namespace(n=0, s='') %}{% for i in range(5) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}", {}),
    ("{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i > 5 %}{% break %}{% endif %}{{ i }}{% endfor %}", {}),
    ("{% for x in [] %}a{% else %}empty{% endfor %} {% for x in 'ab' %}{{ loop.index }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{% endfor %}", {}),
    ("{% for x in [1,2,3] if x != 2 %}{{ loop.index }}:{{ x }}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.cycle('a','b') }} {% endfor %}", {}),
    ("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} {{ greet('B', punct='?') }} {{ greet(name='C') }}", {}),
    ("{% macro wrap() %}<{{ caller() }}>{% endmacro %}{% call wrap() %}inner {{ 1 + 1 }}{% endcall %}", {}),
    ("{% set block %}  captured {{ 42 }}  {% endset %}[{{ block }}] [{{ block|trim }}]", {}),
    ("a  \n  {% if true %}\n    b\n  {% endif %}\n  c {# comment #}\n  {#- strip -#}  d\n{{- ' e ' -}}\n f", {}),
    ("  {%+ if true %}kept{% endif %}\n{% raw %}{{ raw }} {% if %}{% endraw %}\nx\n", {}),
    ("line1\r\nline2\rline3\n", {}),
    ("{{ x is defined }} {{ x.y is defined }} {{ d.missing is defined }} {{ d['m'] is none }} {{ d.missing }}|{{ none }}", {"x": {"y": 1}, "d": {}}),
    ("{{ 5 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 'abc' is lower }} {{ 'a' is string }} {{ 1 is number }} {{ true is boolean }} {{ 1.5 is float }} {{ [1] is iterable }}", {}),
    ("{{ x|default('dflt') }} {{ ''|default('dflt', true) }} {{ 0|default('z') }} {{ [1,2,3]|first }} {{ 'xyz'|last }} {{ 'ab'|list }} {{ [1,1,2]|unique|list }}", {}),
    ("{{ '  a\n\n b\nc'|indent(2) }}|{{ 'x\ny'|indent(2, true) }}|{{ 'a\n\nb'|indent(width='>', blank=true) }}", {}),
    ("{{ 'a.b.c'.replace('.', '-') }} {{ 'aaa'|replace('a', 'b', 2) }} {{ 'x'.startswith(('a', 'x')) }} {{ 'hello'.endswith('lo') }}", {}),
    ("{{ '42'|int + 1 }} {{ '3.5'|float }} {{ 'x'|int }} {{ -3|abs }} {{ 2.567|round(2) }} {{ 2.5|round }} {{ [3, 9, 1]|max }} {{ [3, 9, 1]|min }}", {}),
    ("{{ raise_exception('Only user and assistant roles are supported!') }}", {}),
    ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('System first: ' ~ messages[0]['role']) }}{% endif %}",
     {"messages": [{"role": "user"}]}),
    ("{{ foo.bar }}", {}),
    ("{{ 1 + 'a' }}", {}),
    ("{% for x in 5 %}{% endfor %}", {}),
    ("{{ (1, 2) == [1, 2] }} {{ [1, 2] < [1, 3] }} {{ 'b' > 'a' }} {{ 1 < 2 < 3 }} {{ not 1 == 2 }} {{ 1 if 0 }}|", {}),
    ("{{ 'x' if a is defined else 'y' }} {{ a or 'fallback' }} {{ a and 'yes' }} {{ 0 or [] }}", {}),
    ("{{ x }}", {"x": "a\u0000b"}),
    ("{% set a, b = [1, 2] %}{{ a }}{{ b }} {% set t = (1, 'x') %}{{ t[1] }} {{ {'a': 1}['a'] }} {{ {'a': {'b': 2}}.a.b }}", {}),
    ("{{ 'a' 'b' }} {{ \"\\u00e9\\x41\\n\" }}|{{ 1_000 }} {{ .5 if false else 2.5e1 }}", {}),
    # The parameters of the builtin tables (text/jinja/jinja_render.cpp Filters, StringMethods).
    ("{{ ['b','A','a','B']|unique|list }} {{ ['b','A','a']|unique(case_sensitive=true)|list }} "
     "{{ x|unique(attribute='n')|map(attribute='n')|list }}", {"x": [{"n": "x"}, {"n": "X"}, {"n": "y"}]}),
    ("{{ ['b','A','c']|max }} {{ ['b','A','c']|min }} {{ ['b','a','B']|max }} {{ ['b','a','B']|max(case_sensitive=true) }} "
     "{{ x|max(attribute='v') }} {{ x|min(attribute='v') }}", {"x": [{"v": 3}, {"v": 9}, {"v": 1}]}),
    ("{{ 'ff'|int(base=16) }} {{ '0x1f'|int(0, 16) }} {{ '12'|int(base=8) }} {{ 'zz'|int(7, 16) }}", {}),
    ("{{ 'a'|upper(1) }}", {}),
    ("{{ x|trim(bogus=1) }}", {"x": " a "}),
    ("{{ 'a b'.split(sep=' ', bogus=1) }}", {}),
    ("{{ {'a': 1}.get('a', 2, 3) }}", {}),
]


def test_language_corners_match_jinja2():
    ref = reference()
    env = ref.environment()
    expected = [ref.render(env, t, v) for t, v in CORNERS]
    got = render_cpp(CORNERS)
    wrong = [(t, e, g) for (t, _), e, g in zip(CORNERS, expected, got) if not agrees(e[0], e[1], g)]
    assert not wrong, "\n".join(f"{t!r}\n  jinja2: {e!r}\n  ours:   {g!r}" for t, e, g in wrong)


def test_unsupported_constructs_name_themselves_and_their_line():
    got = render_cpp([("a\n{% include 'x.j2' %}", {}), ("{{ x|wordwrap }}", {}), ("x\n\n{% for a in b recursive %}{% endfor %}", {}),
                      ("{{ x is unknown_test }}", {}), ("{{ f(*args) }}", {})])
    for g, what, line in zip(got, ["'include' statement", "filter 'wordwrap'", "recursive for loops",
                                   "test 'unknown_test'", "*args"], [2, 1, 3, 1, 1]):
        assert g.get("error") == "UNIMPLEMENTED", g
        assert what in g["message"] and f"line {line}" in g["message"], g


def test_hostile_templates_are_bounded():
    """A crafted template (a checkpoint file) cannot make the server loop or allocate without end."""
    got = render_cpp([
        ("{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}", {}),
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", {}),
        ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}", {}),
        ("{{ 'x' * 100000000 }}", {}),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", {}),
        ("{{ range(10000000)|length }}", {}),
        ("{{" + "(" * 5000 + "1" + ")" * 5000 + "}}", {}),
    ])
    for g in got:
        assert g.get("error") in ("RESOURCE_EXHAUSTED",), g
