#!/usr/bin/env bash
# Drive a real text-generation-webui checkout with the gptq_bridge extension through its OpenAI API.
#   scripts/check_webui_api.sh WEBUI_DIR [PORT]
# Needs the webui's own Python dependencies and gptq-bridge installed in the active environment. It installs
# the extension, starts the webui API-only with no --model, sends a completion and a streamed chat request,
# and fails unless both answer from gptq-bridge's model. CI cannot run it (the webui is not a package).
set -euo pipefail
webui=${1:?usage: $0 WEBUI_DIR [PORT]}
port=${2:-5078}
gptq-bridge textgen install "$webui"
cd "$webui"
log=$(mktemp)
python server.py --nowebui --api --api-port "$port" --extensions gptq_bridge >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 120); do grep -q "API URL" "$log" && break; sleep 2; done
grep -q "API URL" "$log" || { cat "$log"; echo "the webui API did not start"; exit 1; }
api="http://127.0.0.1:$port/v1"
model=$(curl -sf "$api/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
echo "model: $model"
completion=$(curl -sf "$api/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "The capital of Japan is", "max_tokens": 12, "temperature": 0}')
echo "completion: $completion"
chat=$(curl -sfN "$api/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is the capital of Japan?"}], "max_tokens": 30, "temperature": 0, "stream": true}')
text=$(printf '%s\n' "$chat" | python -c '
import json, sys
out = []
for line in sys.stdin:
    if line.startswith("data: {"):
        out.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
print("".join(out))')
echo "streamed chat: $text"
case "$completion$text" in *Tokyo*) echo "ok";; *) echo "no Tokyo in the answers"; exit 1;; esac
