"""`kdsearch teacher finetune --address`: the fine-tuning as one Ray task on a cluster GPU.

The task asks one whole GPU, so it runs only on a node that declares one; it loads the data on
its node and runs kdsearch.train.finetune's generator, whose items stream back to the driver as
they come (Ray's generator task): each progress line is said at once, and the weights (on the
CPU) come last through the object store, for the driver to save where the space points.
Files the fine-tuning starts from (`teacher.pretrained_file`, a checkpoint) are read on the
task's node, at the same path, as datasets read from disk are; the hub's weights are fetched there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.exceptions import RayTaskError

from kdsearch.errors import KdsearchError
from kdsearch.search.ray_session import ray_session


@ray.remote(num_cpus=1, num_gpus=1)
def _finetune(tspec: Any, dspec: Any, recipe: Any, force: bool) -> Iterator[Any]:
    from kdsearch.train.finetune import run_finetune

    node = ray.get_runtime_context().get_node_id()[:12]
    gpus = ",".join(str(i) for i in ray.get_gpu_ids())
    yield f"Ray task on node {node} (GPU {gpus})"
    yield from run_finetune(tspec, dspec, recipe, force)


def finetune_on_cluster(
    tspec: Any, dspec: Any, recipe: Any, force: bool, address: str | None, say: Callable[[str], None]
) -> Any:
    """Fine-tune on the Ray cluster at `address` (None: RAY_ADDRESS) as one task with one GPU.

    Args:
        tspec: The space's TeacherSpec.
        dspec: The space's DataSpec (the task's node loads the data itself).
        recipe: The FinetuneRecipe.
        force: As `run_finetune`'s.
        address: The cluster to join.
        say: Where the progress lines go, as they come.

    Returns:
        The FinetuneResult (its weights on the driver's CPU).

    Raises:
        KdsearchError: the cluster declares no GPU, or the task failed (its error's last line).
    """
    from kdsearch.train.finetune import FinetuneResult

    with ray_session(address, say):
        if ray.cluster_resources().get("GPU", 0) < 1:
            raise KdsearchError(
                "--address: the Ray cluster declares no GPU (`ray start --num-gpus`); fine-tuning runs there "
                "as one task with one GPU: add a GPU node, or leave --address out to fine-tune on this machine"
            )
        result = None
        try:
            for ref in _finetune.remote(tspec, dspec, recipe, force):
                item = ray.get(ref)
                if isinstance(item, FinetuneResult):
                    result = item
                else:
                    say(item)
        except RayTaskError as e:
            cause = e.cause if isinstance(e.cause, KdsearchError) else None
            if cause is not None:
                raise KdsearchError(str(cause)) from None
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            raise KdsearchError(f"teacher finetune: the Ray task failed: {lines[-1][:200] if lines else e}") from None
    if result is None:
        raise KdsearchError("teacher finetune: the Ray task ended without the weights")
    return result
