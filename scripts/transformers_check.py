"""Scores a tandem-saved checkpoint with Hugging Face transformers, for the interop test.

usage: transformers_check.py MODEL_DIR TEXT
Prints one JSON object: the ids of TEXT under MODEL_DIR/tokenizer.json and either
"next_token_logprobs" (causal LM) or "score" (sequence classification).
"""
import json, sys
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

model_dir, text = sys.argv[1], sys.argv[2]
ids = Tokenizer.from_file(f"{model_dir}/tokenizer.json").encode(text, add_special_tokens=False).ids
config = AutoConfig.from_pretrained(model_dir)
x = torch.tensor([ids])
with torch.no_grad():
    if any(a.endswith("ForSequenceClassification") for a in config.architectures):
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        out = {"ids": ids, "score": float(model(x).logits[0, 0])}
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        lp = torch.log_softmax(model(x).logits[0].double(), -1)
        out = {"ids": ids, "next_token_logprobs": [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]}
print(json.dumps(out))
