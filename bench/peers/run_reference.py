"""The papers' reference loops (locuslab/wanda `prune_wanda`, IST-DASLab/sparsegpt `llama_sequential`
and `SparseGPT.fasterprune`), re-expressed on plain transformers layers: a third implementation of the
same algorithms, to tell an input choice from rounding.

    python bench/peers/run_reference.py --model DIR --ids ids.pt --out OUT --result R.json --sparsity S
        [--method wanda|sparsegpt]

What the reference does, step by step (read from its code, written anew here):
- the inputs of block 0 are captured once; every block then runs sample by sample (batch 1) with the
  causal mask and rotary embeddings the model made;
- block i: forward hooks on its linear layers accumulate the running mean of ||x_j||^2 per input
  column (`scaler_row`), on the *dense* block, whose inputs are the outputs of the already *pruned*
  blocks before it; then each layer's score |W| * sqrt(scaler_row) is sorted per output row (stable)
  and the lowest int(in * S) are zeroed;
- the block is run again, now pruned, and its outputs become block i+1's inputs.
SparseGPT's loop is the same walk; its hooks accumulate H = 2/n * sum x x^T (n counted in samples,
running mean), and each layer is then solved column block by column block (128): dead columns zeroed,
1 % of mean(diag H) added, U = chol(H^-1) upper; in each block the mask takes the weights with
w^2 / U_jj^2 <= the int(numel * S)-th smallest, and each column's error is spread over the columns after
it. Only torch and transformers are used; no layerprune code.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ids import EmbeddingTap, Phases, load_ids, runner_parser, save_hf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


class Catch(Exception):
    pass


def fasterprune(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128, percdamp: float = 0.01
):
    W = W.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@torch.no_grad()
def prune_sequential(model, ids: torch.Tensor, sparsity: float, method: str = "wanda") -> None:
    layers = model.model.layers
    captured = []

    def catch(_module, args, kwargs):  # block 0's inputs, and what the model passes every block
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise Catch

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for j in range(len(ids)):
        with contextlib.suppress(Catch):
            model(input_ids=ids[j : j + 1], use_cache=False)
    handle.remove()
    inps = [h for h, _ in captured]
    extras = [{k: v for k, v in kw.items() if k != "hidden_states"} for _, kw in captured]

    for layer in layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        scaler = {n: torch.zeros(m.in_features) for n, m in linears.items()}
        hessian = (
            {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
            if method == "sparsegpt"
            else {}
        )
        count = dict.fromkeys(linears, 0)

        def hook(name, scaler=scaler, count=count, hessian=hessian):
            def add(_m, args, _out):
                x = args[0].reshape(-1, args[0].shape[-1]).t().float()
                batch = 1  # the references count samples, not tokens
                if method == "sparsegpt":
                    hessian[name] *= count[name] / (count[name] + batch)
                    count[name] += batch
                    x = (2 / count[name]) ** 0.5 * x
                    hessian[name] += x.matmul(x.t())
                    return
                scaler[name] *= count[name] / (count[name] + batch)
                count[name] += batch
                scaler[name] += torch.norm(x, p=2, dim=1) ** 2 / count[name]

            return add

        handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
        for h, kw in zip(inps, extras):
            layer(h, **kw)
        for h in handles:
            h.remove()
        for n, m in linears.items():
            W = m.weight.data
            if method == "sparsegpt":
                W.copy_(fasterprune(W, hessian.pop(n), sparsity).to(W.dtype))
                continue
            score = W.abs() * torch.sqrt(scaler[n].reshape(1, -1))
            idx = torch.sort(score, dim=-1, stable=True)[1][:, : int(W.shape[1] * sparsity)]
            W[torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)] = 0
        outs = []
        for h, kw in zip(inps, extras):
            o = layer(h, **kw)
            outs.append(o[0] if isinstance(o, tuple) else o)
        inps = outs


def main() -> None:
    ap = runner_parser()
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ph = Phases(T0)
    with ph.phase("load"):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        ids, meta = load_ids(Path(a.ids))
    tap = EmbeddingTap(model.get_input_embeddings())
    with ph.phase("step"):
        prune_sequential(model, ids, a.sparsity, a.method)
    tap.close()
    with ph.phase("save"):
        save_hf(model, tokenizer, a.out)
    ph.write(a.result, "reference loop", tap, meta)


if __name__ == "__main__":
    main()
