"""Multi-process tests: spawn ranks and fail, rather than hang, when they do not finish together."""
import time

import pytest
import torch.multiprocessing as mp


def spawn_within(seconds, fn, args, nprocs):
    """mp.spawn, failing instead of hanging when the ranks do (an error on one rank alone leaves the others in a
    collective, which gloo's timeout does not always end)."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {seconds} s: some rank waits for the others")
