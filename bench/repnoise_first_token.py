"""Issue 19 item 4: one RepNoise step with Bulwark's plain CE vs the reference's CE, whose logits at the
position predicting the first answer token are zeroed (that token's loss is the constant log V).

usage: python bench/repnoise_first_token.py {tiny|smollm2} [rows] [max_len]
Prints the loss terms under each CE and how far the gradient (= SGD update direction) moves."""
import sys

import torch
import torch.nn.functional as F

import bulwark.defenses.repnoise as rn
from bulwark.data.collate import pad_collate
from bulwark.data.formats import load_examples
from bulwark.data.templates import tokenize_example
from bulwark.defenses.repnoise import RepNoise, RepNoiseConfig
from bulwark.losses import causal_lm_loss
from bulwark.models import embedded_model_dir, load_model, load_tokenizer, save_tiny_llama


def reference_ce(logits, labels):
    """The reference's masked_token_ce_loss on answer-token masks: logits zeroed where the next token is
    scored but this one is not an answer token (the position predicting the first answer token)."""
    scored = labels[:, 1:] != -100
    zero = scored & (labels[:, :-1] == -100)
    shifted = logits[:, :-1].float().masked_fill(zero.unsqueeze(-1), 0.0)
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)


which = sys.argv[1]
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4
max_len = int(sys.argv[3]) if len(sys.argv) > 3 else 96
torch.manual_seed(0)
if which == "tiny":
    path = save_tiny_llama("/tmp/w19/tiny", seed=0)
    name = str(path)
else:
    name = str(embedded_model_dir())
model = load_model(name, "fp32")
tok = load_tokenizer(name)
refusals = load_examples("beavertails_refusals.jsonl")[:rows]
harmful = load_examples("beavertails_harmful.jsonl")[:rows]
good = pad_collate([tokenize_example(e, tok, "alpaca", max_len) for e in refusals], tok.pad_token_id or 0)
bad = pad_collate([tokenize_example(e, tok, "alpaca", max_len) for e in harmful], tok.pad_token_id or 0)


class View:
    rank, world_size, module = 0, 1, model

    def forward_outputs(self, batch, **kwargs):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


params = [p for p in model.parameters() if p.requires_grad]
results = {}
for variant, ce in (("plain", causal_lm_loss), ("reference", reference_ce)):
    rn.causal_lm_loss = ce  # the defense's every CE (harmless, harmful output, logit lens)
    defense = RepNoise(RepNoiseConfig(), 1)
    defense.attach(View())
    defense._harmful = bad
    model.zero_grad()
    loss = defense.loss(View(), good)
    loss.backward()
    results[variant] = (loss.item(), dict(defense.metrics()), torch.cat([p.grad.flatten() for p in params]).clone())
rn.causal_lm_loss = causal_lm_loss
(la, ma, ga), (lb, mb, gb) = results["plain"], results["reference"]
V = model.config.vocab_size
n_ans = int((good["labels"][:, 1:] != -100).sum()), int((bad["labels"][:, 1:] != -100).sum())
print(f"model={which} rows={rows} max_len={max_len} vocab={V} log V={torch.log(torch.tensor(float(V))):.3f} answer tokens (harmless, harmful)={n_ans}")
for k in ma:
    print(f"  {k}: plain {ma[k]:.4f}  reference {mb[k]:.4f}")
print(f"  loss: plain {la:.4f}  reference {lb:.4f}")
rel = ((ga - gb).norm() / ga.norm()).item()
cos = F.cosine_similarity(ga, gb, dim=0).item()
print(f"  gradient (SGD update): ||g_plain - g_ref|| / ||g_plain|| = {rel:.4f}, cosine = {cos:.4f}")
# first answer token's own CE and how much of the harmless gradient it carries
with torch.no_grad():
    for label, batch in (("harmless", good), ("harmful", bad)):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lab = batch["labels"]
        first = (lab[:, 1:] != -100) & (lab[:, :-1] == -100)
        lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, lab[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)
        print(f"  {label}: first answer token CE {(-lp[first]).mean():.3f} (reference: {torch.log(torch.tensor(float(V))):.3f}); other answer tokens {(-lp[(lab[:, 1:] != -100) & ~first]).mean():.3f}")
