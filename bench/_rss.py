"""Peak resident memory of one Taylor scoring run, in a fresh process (used by bench/depth.py).

    python bench/_rss.py MODE     MODE = ours | reference | activations

ours:        layerprune's Taylor scorer (gradients reduced by hooks as they are produced);
reference:   the reference's way: every parameter's gradient kept, salience tensors cloned;
activations: forward + backward through every block with no weight gradient (one norm weight
             requires grad so that autograd keeps every activation): the activation memory.
Prints JSON: RSS after loading the model and the peak (VmHWM) reached while scoring.
"""

import json
import sys

import torch
from _proc import reset_peak, status


def main(mode: str) -> None:
    from layerprune.models.loading import load
    from layerprune.score import scorer
    from layerprune.score.run import calibration

    lm = load("fixture", device="cpu", quiet=True)
    windows = calibration(lm)
    ids = windows.input_ids
    reset_peak()
    after_load = status("VmRSS")
    if mode == "ours":
        scorer("taylor")(lm.model, lm.adapter, windows, progress=False)
    elif mode == "reference":
        sal = {}
        loss = lm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        for k, p in lm.model.named_parameters():
            if "weight" in k and "embed_tokens" not in k:
                sal[k] = (p * p.grad).data.clone().float()
    elif mode == "activations":
        for p in lm.model.parameters():
            p.requires_grad_(False)
        lm.model.model.norm.weight.requires_grad_(True)
        lm.model(input_ids=ids, labels=ids).loss.backward()
    print(json.dumps({"mode": mode, "rss_after_load": after_load, "peak": status("VmHWM")}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
