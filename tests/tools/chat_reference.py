"""The reference chat-template renderer: Python's jinja2 configured as transformers'
apply_chat_template configures it (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols; tojson as json.dumps(ensure_ascii=False, ...); raise_exception; strftime_now), and
the conversations the comparison uses."""
import json
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateRaised(Exception):
    """raise_exception() in a template."""


def _raise_exception(message):
    raise TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class GenerationBlock(Extension):
    """transformers' {% generation %}...{% endgeneration %} (it marks assistant text for masks):
    the body renders as a call block's caller."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def variables(entry, messages, extra=None):
    """What apply_chat_template passes: messages, tools and documents (None), the generation prompt
    flag, the special tokens as strings, and the caller's keyword arguments."""
    v = {"messages": messages, "tools": None, "documents": None, "add_generation_prompt": True}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = entry.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None:
            v[name] = token
    v.update(extra or {})
    return v


def render(env, template, vars_):
    """("text", str) or ("raised", message) or ("error", description)."""
    try:
        return "text", env.from_string(template).render(**vars_)
    except TemplateRaised as e:
        return "raised", str(e)
    except jinja2.exceptions.TemplateError as e:
        return "error", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a template may fail any way Python can
        return "error", f"{type(e).__name__}: {e}"


LONG = " ".join(f"word{i}" for i in range(2000))

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [{"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": "Name three primes."}],
    "multi_turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                   {"role": "user", "content": "Tell me a joke."}],
    "system_multi": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                     {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}],
    "empty_system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hello"}],
    "whitespace": [{"role": "system", "content": "  padded system \n"},
                   {"role": "user", "content": "\n  spaced question?  \n\n"}],
    "unicode": [{"role": "user", "content": "Ünïcödé — ça va? 日本語のテキスト 🙂👍🏽 \u00a0nbsp"}],
    "long": [{"role": "user", "content": LONG}],
    "quotes": [{"role": "user", "content": "He said \"hi\" and 'bye' \\ {{ not a tag }} {% raw %}"}],
    "bad_roles": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "tool_role": [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"}],
}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, in °C.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer", "enum": [1, 3, 7], "default": 1},
        "detailed": {"type": "boolean"}},
        "required": ["city"]}}}]

# (name, messages, extra template variables)
CASES = [(name, conv, {}) for name, conv in CONVERSATIONS.items()] + [
    ("tools", CONVERSATIONS["system_user"], {"tools": TOOLS}),
    ("tool_calls", [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call0",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
                    {"role": "tool", "name": "get_weather", "tool_call_id": "call0", "content": "{\"temp\": 21.5}"}],
     {"tools": TOOLS}),
    ("date_string", CONVERSATIONS["single"], {"date_string": "26 Nov 2026"}),
    ("no_thinking", CONVERSATIONS["multi_turn"], {"enable_thinking": False}),
    ("documents", CONVERSATIONS["single"], {"documents": [{"title": "Paris", "text": "Paris is the capital of France."}]}),
]
