# Run from examples/byom: your env (dot_env.py) and code live here, not in splitedge.
set -euo pipefail
PORT=${PORT:-50051}
python train.py 4096                                   # SB3 PPO, a few thousand steps
splitedge export --model runs/dot/model.zip --env dot_env:DotTrack \
    --out bundles/dot --profile pi-zero-2w             # proves itself against predict first
splitedge bundle verify bundles/dot
splitedge serve --bundle bundles/dot --port "$PORT" & SERVER=$!
trap 'kill $SERVER' EXIT
python act.py bundles/dot "127.0.0.1:$PORT"            # connect().act() in your own loop
