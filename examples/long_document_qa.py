"""Ask a question about a long document: a whole Shakespeare play read into memory.

The play (tens of thousands of tokens, several times the model's 8k positions) is ingested into
memkit's chunk memory; then a question is asked. Retrieval finds the passage that holds the answer
(the trace shows which chunks came back) and the model answers from it.

    python examples/long_document_qa.py --threads 1
    python examples/long_document_qa.py --play othello --question "Who is Iago?" --prefix "Iago is" --expect ""

The default question is one the bundled 135M model answers when the passage is in front of it: given the list of
persons, the plain model completes "Polonius is the Lord" with "Chamberlain" (without the list: "Protector of
the Jews"). "Who is Polonius?" is beyond it even then (it answers "the King" with the list in its prompt).
"""

import argparse
import time

import torch

import memkit
from memkit.corpora import play_text
from memkit.models import load_smollm2

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--play", default="hamlet", help="play name from the shakespeare package (default: hamlet)")
parser.add_argument("--question", default="In the list of persons represented, what is Polonius?",
                    help="the question")
parser.add_argument("--prefix", default="Polonius is the Lord", help="start of the answer the model continues")
parser.add_argument("--expect", default="Chamberlain",
                    help="a word the right answer contains, to say whether it was answered ('' to skip the check)")
parser.add_argument("--max-tokens", type=int, default=None, help="read only the first N tokens of the play")
parser.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 on a busy or shared machine)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

hf_model, tok = load_smollm2()
model = memkit.wrap(hf_model, tokenizer=tok)

ids = tok(play_text(args.play), add_special_tokens=False)["input_ids"][: args.max_tokens]
t0 = time.perf_counter()
info = model.memory.ingest(ids)                      # progress bar; the whole play becomes chunk memory
print(f"read {info['tokens']} tokens of {args.play} into {info['chunks_added']} chunks "
      f"in {time.perf_counter() - t0:.0f}s")

prompt = f"\n\nQuestion: {args.question}\nAnswer: {args.prefix}"
q = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
out = model.generate(q, attention_mask=torch.ones_like(q), max_new_tokens=16, do_sample=False)
answer = tok.decode(out[0, q.shape[1]:], skip_special_tokens=True)
print(f"Q: {args.question}\nA: {args.prefix}{answer}")
if args.expect:
    print(f"expected {args.expect!r}: {'answered' if args.expect.lower() in answer.lower() else 'MISSED'}")
print("\nretrieved passages:")
for t in model.memory.trace():
    print(f"  tokens {t['span'][0]:>6}-{t['span'][1]:<6} score {t['score']:.3f}  {' '.join(t['text'].split())[:80]}")
