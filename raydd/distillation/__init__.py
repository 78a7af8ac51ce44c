"""Method-agnostic distillation: plan the groups, run each (Ray task or in-process) with the
method ``distill.method`` names, merge them into RUN/synset."""
from .aggregate import aggregate, soft_labels, write_grid
from .init import init_images, initial_images
from .plan import GROUP_SEED_STRIDE, DataShape, GroupPlan, fingerprint, plan_groups, service_name, split_ipc
from .runner import DistillResult, ray_device, run_distill
from .view import LiveView
from .worker import MAX_ROLLBACKS, build_method, distill_group

__all__ = ["GROUP_SEED_STRIDE", "MAX_ROLLBACKS", "DataShape", "DistillResult", "GroupPlan", "LiveView",
           "aggregate", "build_method", "distill_group", "fingerprint", "init_images", "initial_images",
           "plan_groups", "ray_device", "run_distill", "service_name", "soft_labels", "split_ipc", "write_grid"]
