"""Run by torchrun (or alone) from test_pipeline_parallel.py: one forward/backward over the first global batch,
then every rank's gradients (megatron-core's DDP main_grad) saved in checkpoint layout, so that
reshard.full_state_dict assembles the full gradient of any layout for comparison.

  grad_worker.py OUT_DIR <pretrain_patch_gpt flags>
"""

import sys

import torch.distributed as dist

from megatron_patch.checkpoint import layout, storage
from megatron_patch.config.flags import parse_args
from megatron_patch.config.schema import to_dict
from megatron_patch.distributed import parallel
from megatron_patch.training.trainer import Trainer

out, argv = sys.argv[1], sys.argv[2:]
cfg = parse_args(argv).resolve(parallel.launch_from_env().world_size)
parallel.initialize(cfg.parallel, cfg.seed)
trainer = Trainer(cfg)
trainer.load()
train, _ = trainer.build_datasets()
trainer.engine.forward_backward(trainer.data_iterators(train, 0))
grads = {
    layout.model_key(i, len(trainer.models)): {name: p.main_grad.detach().clone()
                                                    for name, p in model.named_parameters()}
    for i, model in enumerate(trainer.models)
}
storage.save(out, 1, {**grads, "config": to_dict(cfg)}, trainer.run_description)
dist.barrier()
parallel.destroy()
