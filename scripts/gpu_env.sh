# Source this on the GPU host (no package index) from the checkout root, with the wheels of
# ../shared/gpu/wheels-cp312.txt in .whl/ (see docs/benchmarks.md, "Running it"):
#     source scripts/gpu_env.sh
# It installs the wheels into /tmp/site, puts them and the checkout on the path, and registers the
# python3 Jupyter kernel there (needed by the notebook tests and the autograder).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: download them first (docs/benchmarks.md)" >&2; return 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH JUPYTER_PATH=/tmp/site/share/jupyter MPLBACKEND=Agg
export PYTHONUNBUFFERED=1
python3 -m ipykernel install --prefix /tmp/site --name python3 >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
