"""Peer for `tandem bench generate`: transformers' `generate` with its KV cache on the same
shapes (a randomly initialised GPT-2 of 4 layers, width 256, 4 heads, vocabulary 512; batch 64,
16 prompt tokens, 32 sampled tokens at temperature 1 with no stop), on one thread.

    python scripts/peer_generate.py [--threads 1] [--repeats 3]

Needs torch and transformers. Prints one JSON line: the median tokens/s over the repeats.
"""
import argparse, json, statistics, time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--prompt-len", type=int, default=16)
p.add_argument("--new-tokens", type=int, default=32)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=512, n_positions=max(64, a.prompt_len + a.new_tokens))
model = GPT2LMHeadModel(cfg).eval()
ids = torch.randint(0, 512, (a.batch, a.prompt_len))
mask = torch.ones_like(ids)
kw = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=a.new_tokens,
          min_new_tokens=a.new_tokens, pad_token_id=0, use_cache=True)
with torch.no_grad():
    model.generate(ids, **kw)  # warm-up
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        times.append(time.perf_counter() - t)
assert out.shape[1] == a.prompt_len + a.new_tokens
print(json.dumps({"peer": "transformers generate", "threads": a.threads, "batch": a.batch,
                  "tokens_per_s": a.batch * a.new_tokens / statistics.median(times)}))
