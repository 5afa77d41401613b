"""Run under torchrun: a ZeRO-3 partitioned model as recover uses it, checked against what the test computes.

argv: model_dir out_dir

Every rank writes `out_dir/rank{r}.json`: how many elements of each parameter it holds whole and in its
slice (both before any gather), and the generations for 3 prompts split 2 / 1 over the ranks (uneven:
the padded share and `synced_gpus` must keep the ranks' forwards in step). Rank 0 also writes
`logits.pt` (a forward through `gathered_per_module`), `edited.pt` (one weight after `set_elements`,
gathered), and `hidden.pt` (LayerwiseModel's mean last-token state, with a rank that has no batch).
"""

import json
import sys
from pathlib import Path

import torch

from bulwark.engine.dist import exit_after_success
from bulwark.engine.partitioned import (
    full_numel,
    gathered,
    gathered_per_module,
    load_partitioned,
    set_elements,
)
from bulwark.eval.generate import generate
from bulwark.models import load_tokenizer
from bulwark.recover.hidden import LayerwiseModel, decoder_layers, make_batches


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    model = load_partitioned(model_dir, "fp32").eval()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    held = {name: [p.data.numel(), p.ds_tensor.numel(), full_numel(p)] for name, p in model.named_parameters()}
    _, layers = decoder_layers(model)

    ids = torch.arange(3, 3 + 2 * 9).view(2, 9) % 200
    with gathered_per_module(model, layers), torch.no_grad():
        logits = model(input_ids=ids).logits

    name, param = "model.layers.1.mlp.up_proj.weight", model.get_submodule("model.layers.1.mlp.up_proj").weight
    index = torch.tensor([0, 5, full_numel(param) // 2, full_numel(param) - 1])
    set_elements(param, index, torch.tensor([1.5, -2.5, 3.5, -4.5]))
    with gathered([param]):
        edited = param.detach().clone()

    # 3 prompts on 2 ranks: rank 0 takes prompts 0 and 2, rank 1 prompt 1 plus a padding repeat
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    prompts = ["hello there", "a b c d e f g", "one two"]
    mine = list(range(rank, len(prompts), world))
    share = -(-len(prompts) // world)
    padded = [prompts[i] for i in mine] + [prompts[0]] * (share - len(mine))
    with gathered_per_module(model, layers):
        outputs = generate(model, tokenizer, padded, max_new_tokens=[3, 6][: len(padded)], batch_size=1)[: len(mine)]

    # 1 batch on 2 ranks: rank 1 has none and must still take part in every gather
    batches = make_batches([[5, 6, 7, 8], [9, 10, 11]], 0, 4)
    runner = LayerwiseModel(model, layer=1)  # below the edited layer 1
    _, mean = runner.mean_last_hidden(batches[rank::world], 2)

    (out / f"rank{rank}.json").write_text(json.dumps({"held": held, "outputs": dict(zip(mine, outputs, strict=True))}))
    if rank == 0:
        torch.save(logits, out / "logits.pt")
        torch.save({"name": name, "index": index, "value": edited}, out / "edited.pt")
        torch.save(mean, out / "hidden.pt")


if __name__ == "__main__":
    main()
    exit_after_success()
