"""Greedy continuations of prompts by a tandem-saved causal LM under Hugging Face transformers,
for the interop test.

usage: transformers_generate.py MODEL_DIR MAX_NEW_TOKENS PROMPT...
Loads MODEL_DIR with AutoTokenizer and AutoModelForCausalLM, encodes each PROMPT without
special tokens, decodes greedily (one prompt at a time, no padding) up to MAX_NEW_TOKENS,
stopping after the model's EOS (generation_config.json), and prints one JSON list of
{"prompt_ids", "response_ids", "text"}: the response ids include the EOS when it stopped;
"text" decodes them without it.
"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, max_new, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
out = []
with torch.no_grad():
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        y = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )
        response = y[0, len(ids):].tolist()
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        kept = response[:-1] if response and response[-1] in eos else response
        out.append({"prompt_ids": ids, "response_ids": response, "text": tokenizer.decode(kept)})
print(json.dumps(out))
