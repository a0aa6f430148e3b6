#!/usr/bin/env bash
# CI: build the wheel, install it (not editable) into a fresh virtual environment, and run the shipped
# presets from a folder outside the checkout. It catches what the test suite cannot: the suite runs the
# checkout, where recipes/ is always next to the package, while a pip-installed user has only the wheel.
#
#   .ci/wheel_smoke.sh            # fresh venv: torch==2.13.0 first, then the wheel with its deps from PyPI
#   WHEEL_SMOKE_SYSTEM_SITE=1 .ci/wheel_smoke.sh
#                                 # venv over the system site-packages (deps already installed there): the
#                                 # wheel goes in with --no-deps, and the import is checked to be the wheel's
#   WHEEL_SMOKE_DIR=/tmp/ws .ci/wheel_smoke.sh   # keep the work folder (default: a new temporary one)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WHEEL_SMOKE_DIR:-$(mktemp -d -t hf_posenc_wheel_smoke.XXXXXX)}
python=${PYTHON:-python3}
mkdir -p "$work"
work=$(cd "$work" && pwd)
# A PYTHONPATH pointing at a checkout would shadow the wheel; the smoke test must see only the install.
unset PYTHONPATH
# Everything the run writes stays in the work folder: a fresh base-model cache, no Hub, no user caches.
export HF_POSENC_CACHE="$work/cache" HF_HOME="$work/hf_home" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

started=$SECONDS
lap=$SECONDS
timing() {
    echo "wheel_smoke: $1 in $((SECONDS - lap)) s (total $((SECONDS - started)) s)"
    lap=$SECONDS
}

echo "wheel_smoke: work folder $work"
rm -rf "$work/dist" "$work/venv" "$work/run"
"$python" -m pip wheel --no-deps "$repo" -w "$work/dist" -q
wheel=$(ls "$work"/dist/hf_posenc-*.whl)
timing "built $(basename "$wheel")"

if [ "${WHEEL_SMOKE_SYSTEM_SITE:-0}" = 1 ]; then
    "$python" -m venv --system-site-packages "$work/venv"
    "$work/venv/bin/pip" install -q --no-deps "$wheel"
else
    "$python" -m venv "$work/venv"
    # torch first and pinned: any other torch request pulls a multi-GB CUDA build (DESIGN §6).
    "$work/venv/bin/pip" install -q torch==2.13.0
    "$work/venv/bin/pip" install -q "$wheel"
fi
timing "installed the wheel into $work/venv"

mkdir -p "$work/run"
cd "$work/run"  # outside the checkout: nothing can be read from recipes/ by accident
bin="$work/venv/bin"
site=$("$bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The import, and the recipes, must be the wheel's copy, not an editable install of some checkout.
"$bin/python" - "$site" <<'EOF'
import sys
from pathlib import Path

import hf_posenc
from hf_posenc.presets import recipes_dir

site = Path(sys.argv[1]).resolve()
for what, path in (("hf_posenc", Path(hf_posenc.__file__)), ("recipes", recipes_dir())):
    if site not in path.resolve().parents:
        sys.exit(f"wheel_smoke: {what} comes from {path}, not from the wheel in {site}")
print(f"wheel_smoke: hf_posenc and its recipes import from {site}")
EOF

"$bin/hf-posenc" recipes | tee recipes.txt
for name in compare_quick compare_tiny finetune_lora token_perplexity passkey_accuracy multi_gpu; do
    grep -q "^$name " recipes.txt || { echo "wheel_smoke: $name missing from 'hf-posenc recipes'" >&2; exit 1; }
done
timing "listed the recipes"

"$bin/hf-posenc" compare tiny --out d > compare.txt
"$bin/python" - <<'EOF'
import json
import sys

results = json.load(open("d/results.json"))
names = [variant["name"] for variant in results["variants"]]
if len(names) != 9 or not all(variant["perplexity"] for variant in results["variants"]):
    sys.exit(f"wheel_smoke: expected 9 evaluated variants from compare_tiny, got {names}")
EOF
timing "ran 'hf-posenc compare tiny' (base pretraining included)"

"$bin/hf-posenc" recipes cp quick .
"$bin/hf-posenc" recipes cp tiny .
"$bin/python" -c "
from hf_posenc.experiments.config import load_config
from hf_posenc.experiments.context_extension.config import CompareConfig
cfg = load_config(CompareConfig, 'compare_quick.yaml')
assert len(cfg.variants) == 9, cfg.variants
"
# The copied tiny preset, run by path into the same folder: the same settings, so all 9 variants are reused.
"$bin/hf-posenc" compare ./compare_tiny.yaml --out d > compare_copy.txt
reused=$(grep -c "already done: reusing" d/compare.log)
[ "$reused" = 9 ] || { echo "wheel_smoke: the copied tiny preset reused $reused of 9 variants" >&2; exit 1; }
timing "copied quick/tiny; the copies load and run"

# The packaged recipe script under accelerate: a 2-step ALiBi LoRA run on compare_tiny's base (its model
# section is copied, so the base cached above is reused). The finetune presets run the same script, and
# its model card needs the wheel's card templates.
"$bin/python" -c "
import yaml
model = yaml.safe_load(open('compare_tiny.yaml'))['model']
yaml.safe_dump({'model': model, 'posenc': {'kind': 'alibi'}, 'lora': {'r': 2, 'alpha': 4},
                'train': {'seq_len': 32, 'steps': 2, 'batch_size': 2, 'warmup_steps': 1},
                'output': {'dir': 'runs/finetune_tiny'}}, open('finetune_tiny.yaml', 'w'))
"
# Through the venv's interpreter: over the system site, a bare `accelerate` may be the system's script, which
# launches the recipe with the system Python (and whatever hf_posenc that one imports).
"$bin/python" -m accelerate.commands.accelerate_cli launch --num_processes 1 "$("$bin/hf-posenc" recipes path finetune_lora)" \
    --config finetune_tiny.yaml > finetune.txt 2>&1 || { cat finetune.txt >&2; exit 1; }
for file in adapter/adapter_config.json adapter/README.md merged/config.json; do
    [ -f "runs/finetune_tiny/$file" ] || { echo "wheel_smoke: finetune_lora wrote no $file" >&2; exit 1; }
done
timing "ran the packaged finetune_lora.py under accelerate launch"
echo "wheel_smoke: OK in $((SECONDS - started)) s"
