"""One rank of a CPU DistributedDataParallel run (gloo, file:// rendezvous) for test_train.py.

    python tests/torch/ddp_worker.py RANK WORLD INIT_FILE OUT_DIR RUN_JSON

RUN_JSON holds {"task": {"name", "params"}, "model": ModelConfig dict, "train": TrainConfig dict}.
Every rank writes its final weights to OUT_DIR/rank{RANK}.safetensors so the test can compare them.
"""

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from common.config import ModelConfig, TrainConfig
from common.tasks import make
from sleep_torch.model import HybridLM
from sleep_torch.train import train


def main(rank: int, world: int, init_file: str, out_dir: str, run_json: str) -> None:
    torch.set_num_threads(1)
    run = json.loads(run_json)
    task = make(run["task"]["name"], **run["task"]["params"])
    mc, tc = ModelConfig.from_dict(run["model"]), TrainConfig.from_dict(run["train"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = HybridLM(mc, seed=tc.seed)
        train(task, mc, tc, out_dir, progress=False, model=model)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
