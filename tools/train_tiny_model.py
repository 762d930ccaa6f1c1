"""Trains attnscope's tiny model: a 2-layer Llama-architecture language model over bytes whose
attention has real circuits to look at (previous-token heads, induction heads, a sink), unlike
the random-weight checkpoints of tests/tools/checkpoint.py.

Data (deterministic from --seed, nothing downloaded): half of each batch is English text (the
license texts every Debian system carries, /usr/share/common-licenses), half is a random span of
printable bytes repeated (the task that grows induction heads: the second copy is predictable only
by looking back at what followed the current byte's earlier occurrence), each after a BOS.

Writes a Hugging Face checkpoint folder (config.json, model.safetensors in float32, tokenizer.json:
a byte-level vocabulary of 256 bytes plus <s> and </s>, no merges, so text maps to its UTF-8 bytes)
that attnscope serves as is. Run by the project venv's Python (deploy/python-env.sh: torch,
transformers, safetensors); a few minutes on 2 CPU cores.

  .venv/bin/python tools/train_tiny_model.py OUT_DIR [--steps N] [--seed S]
"""
import argparse
import glob
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BOS, EOS, VOCAB = 256, 257, 258
SEQ = 64  # --seq: induction heads form at 64 (not at 128 in 2500 steps) and serve spans up to 31


def corpus():
    paths = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
    data = b"\n\n".join(open(p, "rb").read() for p in paths)
    if len(data) < 100_000:
        raise SystemExit(f"train_tiny_model: only {len(data)} bytes of text under /usr/share/common-licenses")
    return torch.tensor(list(data), dtype=torch.long)


def batch(text, size, gen, repeated=0.5, seq=SEQ):
    """[size, SEQ] ids: the first (1 - repeated) of the rows text windows, the rest BOS + random
    span + the same span + text filler (span length 8..60, so the copy starts at varying
    positions)."""
    out = torch.empty(size, seq, dtype=torch.long)
    out[:, 0] = BOS
    half = size - int(round(size * repeated))
    starts = torch.randint(0, len(text) - seq, (size,), generator=gen)
    for i in range(size):
        out[i, 1:] = text[starts[i] : starts[i] + seq - 1]
    for i in range(half, size):
        n = int(torch.randint(8, (seq - 1) // 2 + 1, (1,), generator=gen))
        span = torch.randint(32, 127, (n,), generator=gen)
        out[i, 1 : 1 + n] = span
        out[i, 1 + n : 1 + 2 * n] = span
    return out


def tokenizer_json():
    """Byte-level BPE without merges: each UTF-8 byte is one token (GPT-2's byte-to-unicode map),
    ids 0..255 in byte order, then <s> (256) and </s> (257)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    vocab["<s>"], vocab["</s>"] = BOS, EOS
    special = lambda i, s: dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False,
                                normalized=False, special=True)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(BOS, "<s>"), special(EOS, "</s>")],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": False},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


def circuits(model, seed, span=40, rows=64):
    """On fresh sequences (BOS + `span` random printable bytes, twice): the loss on each copy (the
    first is chance, ln 95 = 4.55; an induction circuit brings the second far below it) and per
    (layer, head) the mean attention of the second copy's rows to the key after the current byte's
    earlier occurrence (induction) and of every row to the one before it (previous token)."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(32, 127, (rows, span), generator=g)
    ids = torch.cat([torch.full((rows, 1), BOS), body, body], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    first, second = nll[:, 1:span].mean().item(), nll[:, span + 1 :].mean().item()
    rows_i = torch.arange(span + 1, 2 * span + 1)
    induction = torch.stack([a[:, :, rows_i, rows_i - span + 1].mean(dim=(0, 2)) for a in out.attentions])
    r = torch.arange(1, 2 * span + 1)
    previous = torch.stack([a[:, :, r, r - 1].mean(dim=(0, 2)) for a in out.attentions])
    return first, second, induction, previous


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=SEQ, help="training sequence length")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeated", type=float, default=0.9, help="the share of repeated-span rows")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=BOS,
                      eos_token_id=EOS, tie_word_embeddings=False, torch_dtype="float32",
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    text = corpus()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        ids = batch(text, args.batch, gen, args.repeated, args.seq)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            model.eval()
            first, second, induction, previous = circuits(model, args.seed + 1, span=(args.seq - 1) // 2)
            model.train()
            print(f"step {step} loss {loss.item():.3f} copies {first:.2f}/{second:.2f} induction "
                  f"{induction.max().item():.2f} previous {previous.max().item():.2f} ({time.time() - t0:.0f} s)",
                  flush=True)
    model.eval()
    os.makedirs(args.out_dir, exist_ok=True)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    with open(os.path.join(args.out_dir, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f, ensure_ascii=False, indent=1)
    first, second, induction, previous = circuits(model, args.seed + 1, span=(args.seq - 1) // 2)
    print(f"loss on the first copy {first:.3f}, on the second {second:.3f}")
    print("induction [layer, head]:", [[round(x, 2) for x in row] for row in induction.tolist()])
    print("previous token [layer, head]:", [[round(x, 2) for x in row] for row in previous.tolist()])


if __name__ == "__main__":
    main()
