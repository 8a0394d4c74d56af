# Run from examples/byom: your env (dot_env.py) and code live here, not in splitedge.
set -euo pipefail
PORT=${PORT:-50051}
python train.py 4096                                   # SB3 PPO, a few thousand steps
splitedge export --model runs/dot/model.zip --env dot_env:DotTrack \
    --out bundles/dot --profile pi-zero-2w             # proves itself against predict first
splitedge bundle verify bundles/dot
splitedge serve --bundle bundles/dot --host 0.0.0.0 --port "$PORT" & SERVER=$!
trap 'kill $SERVER' EXIT
python act.py bundles/dot "127.0.0.1:$PORT"            # connect().act() in your own loop
# flash it to an emulated Pi Zero 2 W (a real sshd in its own network namespace)
splitedge device emulate --profile pi-zero-2w --workdir emu --json > emu.json & EMU=$!
trap 'kill $SERVER $EMU' EXIT
until [ -s emu.json ]; do kill -0 $EMU; sleep 1; done  # printed once the device is up
DEVICE_SEES_US=$(python -c 'import json; print(json.load(open("emu.json"))["host_address_from_device"])')
splitedge flash --host pi-zero-2w-emu --ssh-config emu/ssh_config --profile pi-zero-2w \
    --bundle bundles/dot --server "$DEVICE_SEES_US:$PORT" --offline \
    --source env:dot_env:DotTrack --env-package .      # your env's module rides along
splitedge status --host pi-zero-2w-emu --ssh-config emu/ssh_config
