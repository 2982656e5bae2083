"""Quickstart: three lines turn a Hugging Face causal LM into one that reads far past its window.

SmolLM2-135M-Instruct was trained on 8k positions. Wrapped by memkit it reads a 16k-token prompt
(a passkey hidden in filler) block by block, keeps what leaves its window as chunk memory, and
retrieves the right chunk to answer.

    python examples/quickstart.py                 # 16k tokens, a minute or two on 2 CPU cores
    python examples/quickstart.py --tokens 32k
"""

import argparse

import torch

import memkit
from memkit.evaluation.haystack import build_haystack, parse_length
from memkit.models import load_smollm2

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--tokens", default="16k", help="prompt length in tokens, k = 1024 (default: 16k)")
parser.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 on a busy or shared machine)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

hf_model, tok = load_smollm2()                             # any local HF causal LM works the same way
hay = build_haystack(tok, parse_length(args.tokens), depth=0.3, filler="classic", prompt="plain")
prompt = torch.tensor([hay.input_ids])                     # (1, N): far longer than the model's 8k positions

# The three lines:
model = memkit.wrap(hf_model, tokenizer=tok)               # 1. wrap (defaults: MemLong-style, faiss-flat)
out = model.generate(prompt, max_new_tokens=8, do_sample=False)  # 2. use it like the HF model
print(tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))  # 3. read the answer

print(f"expected key: {hay.key}; retrieved chunks (token spans):",
      [tuple(t["span"]) for t in model.memory.trace()])
