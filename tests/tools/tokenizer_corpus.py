"""Hard strings for tokenizer tests: whitespace, Unicode, digits, contractions, scripts, emoji,
code, special-token strings, long runs. Written as a JSON list by `corpus()`."""

SPECIALS = ["<s>", "</s>", "<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[INST]", "[/INST]"]

PARAGRAPH = (
    "Attention is all you need, they said; and so, in 2017, the Transformer arrived. Its self-attention "
    "layers let every token look at every other token — an O(n²) cost that long-context models (32k, 128k "
    "tokens!) still pay today. KV-cache eviction methods such as H2O and SnapKV keep only the keys that "
    "received the most attention... but which ones are those? Let's measure: 3.14159, 2,718, $1,000,000; "
    "e-mail: someone@example.org; URL: https://example.org/a?b=c&d=e#f.")


def corpus():
    texts = [
        "", " ", "  ", "Hello world", " leading space", "trailing space ", "Hello  world   three    four",
        "tabs\there\t\tx", "\t\tindented", "line\r\nbreak\n\nx", "\n\n\n", "a\r\rb", "mixed \t \n \r\n end",
        "a\u0085b", "nbsp\u00a0here", "em\u2003space", "ideographic\u3000space", "thin\u2009space\u200bzero",
        "it's I'M you'RE they've we'll she'd don't", "IT'S YOU'RE THEY'VE", "'s 't 're 'quoted'",
        "!!!??? ... --- ;;; ,,, ((( ))) [[[ ]]] {{{ }}}", "a.b,c;d:e!f?g", "$%^&*()_+-=~`|\\/<>",
        "naïve café résumé Ångström", "e\u0301 combining a\u0300 o\u0308", "Ça va? Où est-ce? Über Straße",
        "日本語のテキストです。", "中文文本，标点符号！", "한국어 텍스트", "مرحبا بالعالم", "שלום עולם",
        "Привет, мир!", "Γειά σου κόσμε", "हिन्दी पाठ", "ไทย",
        "👩\u200d👩\u200d👧\u200d👦 family 👍🏽 thumbs 🏳️\u200d🌈 flag", "emoji🙂inline😀text",
        "def f(x):\n    return x**2  # comment\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id = 42;", "x = {'a': [1, 2.5e-3]}",
        "a" * 500, "ab" * 100, " " * 50 + "x", "x" + "\n" * 20, "1" * 50, PARAGRAPH, PARAGRAPH * 3,
    ]
    texts += ["".join(str((i * 7 + k) % 10) for k in range(n)) for i, n in enumerate(range(1, 11))]
    texts += [f"number {'9' * n} end" for n in range(1, 11)]
    texts += [f"before {s} after" for s in SPECIALS] + ["".join(SPECIALS), " ".join(SPECIALS)]
    return texts


if __name__ == "__main__":
    import json
    import sys
    json.dump(corpus(), sys.stdout, ensure_ascii=False)
