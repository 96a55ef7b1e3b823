"""A stand-in for `mvlm rollout` without vLLM: the real ``RolloutService`` and HTTP front of
:mod:`mvlm.rl.rollout.server`, with a transformers model as the engine pool.

    python tests/e2e/_hf_rollout_server.py HF_DIR PORT

Used by tests/e2e/test_vllm_server_mode.py so that CI (which has no vLLM venv) runs GRPO's
server mode end to end: weight sync through the real protocol into a real model that generates,
log-probs the trainer can be compared with, and a process the test can kill. The engine samples
like vLLM does for the flags the tests use: temperature (0 = greedy), top-k, top-p; it returns
``log_softmax(logits / T)`` at each token (``logprobs``) and the log-prob under the filtered
distribution it was drawn from (``sampling_logprobs``). A repetition penalty is refused (the
tests do not use one here).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


class HFPool:
    """One transformers model as the engine (fp32, no KV cache: tiny models, short outputs)."""

    def __init__(self, hf_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        from mvlm.rl.rollout.builtin import eos_token_ids_from_hf_dir

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.eos = set(eos_token_ids_from_hf_dir(hf_dir))
        self.calls = 0

    def sync_begin(self) -> None:
        pass

    @torch.no_grad()
    def load(self, tensors) -> None:
        params = dict(self.model.named_parameters())
        for name, t in tensors:
            params[name].copy_(t)

    def sync_finish(self) -> None:
        pass

    def reset_prefix_cache(self) -> None:
        pass  # no cache

    def read(self, names) -> dict:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().clone() for n in names}

    @torch.no_grad()
    def generate(self, prompts, sampling) -> list[list[dict]]:
        if sampling["repetition_penalty"] != 1.0:
            raise ValueError("the transformers stand-in engine has no repetition penalty")
        T = float(sampling["temperature"])
        k, top_p = int(sampling["top_k"]), float(sampling["top_p"])
        seed = sampling["seed"] if sampling["seed"] is not None else 1000 + self.calls
        self.calls += 1
        gen = torch.Generator().manual_seed(int(seed))
        out = []
        for p in prompts:
            group = []
            for _ in range(int(sampling["num_generations"])):
                ids, lps, slps = list(p), [], []
                stop = "length"
                for _ in range(int(sampling["max_completion_length"])):
                    logits = self.model(torch.tensor([ids])).logits[0, -1].double()
                    logits[list(sampling["suppress_token_ids"])] = -float("inf")
                    full = torch.log_softmax(logits / (T if T > 0 else 1.0), -1)
                    if T == 0:
                        tok, slp = int(full.argmax()), 0.0
                    else:
                        z = logits / T
                        if k > 0:
                            z[z < torch.topk(z, k).values[-1]] = -float("inf")
                        if top_p < 1.0:
                            srt, idx = torch.sort(z, descending=True)
                            cum = torch.softmax(srt, -1).cumsum(-1)
                            drop = cum - torch.softmax(srt, -1) > top_p
                            z[idx[drop]] = -float("inf")
                        q = torch.log_softmax(z, -1)
                        tok = int(torch.multinomial(q.exp(), 1, generator=gen))
                        slp = float(q[tok])
                    ids.append(tok)
                    lps.append(float(full[tok]))
                    slps.append(slp)
                    if tok in self.eos:
                        stop = "eos"
                        break
                group.append({"token_ids": ids[len(p):], "logprobs": lps,
                              "sampling_logprobs": slps, "stop_reason": stop})
            out.append(group)
        return out


def main() -> int:
    from mvlm.rl.rollout.server import RolloutServerConfig, RolloutService, _make_handler

    hf, port = sys.argv[1], int(sys.argv[2])
    logging.basicConfig(level="INFO")
    service = RolloutService(RolloutServerConfig(model=hf, port=port), HFPool(hf))
    service.dtype = torch.float32
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(service))
    httpd.daemon_threads = True
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    print(f"hf rollout stand-in: serving {hf} on 127.0.0.1:{port}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.1)
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
