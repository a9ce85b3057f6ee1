"""Where flows run: Prefect API mode (ephemeral or a server) and the dask task runner to use.

Chosen once at the edge; the flows and the library never look at this themselves.
"""

from __future__ import annotations

import os

import dask
from prefect_dask import DaskTaskRunner

from flows.server import prefect_server_configured
from pipeline.threads import batches_per_worker


def local_workers_are_processes(processes: bool | None, temporary_server: bool = False) -> bool:
    """The catalog's choice, else processes with a configured server and threads without one or with the
    command's own temporary server (`flows.server`): see `dask_task_runner`."""
    if processes is not None:
        return processes
    return prefect_server_configured() and not temporary_server


def batches_run_in_this_process(address: str | None, processes: bool | None, cuda: bool,
                                temporary_server: bool = False) -> bool:
    """Whether `dask_task_runner` with these settings runs the batches as threads of this process (a local
    cluster of threads), so that models loaded here are the ones its batches use."""
    return not address and not cuda and not local_workers_are_processes(processes, temporary_server)


# A local cluster of one worker whose threads run in this process (the README's build) has no dashboard,
# no nanny and no other worker: what serves those only wakes the event loop and takes the GIL. Its
# 50-a-second tick (a blocked-loop detector), the memory monitor's 10 a second, the system monitor,
# work stealing and the active memory manager: what they cost a bundled build is measured by
# `bench/build_cpu.py` (docs/benchmarks.md).
QUIET_ONE_WORKER = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.scheduler.work-stealing": False,
    "distributed.scheduler.active-memory-manager.start": False,
}


def dask_task_runner(address: str | None, workers: int = 1, processes: bool | None = None,
                     cuda: bool = False, threads: int | None = None,
                     temporary_server: bool = False) -> DaskTaskRunner:
    """An existing scheduler when `address` is given, else a LocalCluster.

    In Prefect's ephemeral mode every dask worker *process* would start its own temporary Prefect
    server (several times slower: measured in docs/design-notes.md, note 7), so by default the local
    cluster runs its workers as threads of this process then, and with the command's own temporary
    server too (the threads share the models it loads while that server starts); with a real server,
    as processes.
    """
    if address:
        return DaskTaskRunner(address=address)
    if cuda:
        return cuda_task_runner(threads)
    processes = local_workers_are_processes(processes, temporary_server)
    kwargs = {"n_workers": workers, "threads_per_worker": batches_per_worker(threads, workers),
              "processes": processes, "dashboard_address": None}
    # No dashboard, so nobody reads the workers' statistical profiler: it samples every thread's stack
    # 100 times a second, holding the GIL the batches' pre- and post-processing needs.
    dask.config.set({"distributed.worker.profile.enabled": False})
    if workers == 1 and not processes:
        dask.config.set(QUIET_ONE_WORKER)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def cuda_task_runner(threads: int | None = None) -> DaskTaskRunner:
    """One dask worker process per visible GPU (dask-cuda pins each to its device): every worker
    loads the detector chain once and keeps it for all its batches. Two batches at a time per worker
    by default, so one's host work overlaps the other's GPU work (the chain is shared, not copied)."""
    import importlib.util

    if importlib.util.find_spec("dask_cuda") is None:
        raise ValueError("execution.dask_cuda needs the dask-cuda package (pip install dask-cuda) on a machine "
                         "with NVIDIA GPUs")
    return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                          cluster_kwargs={"threads_per_worker": threads or 2, "dashboard_address": None})


def default_task_runner() -> DaskTaskRunner:
    """The runner a served (deployed) build uses: FACECURATE_DASK_ADDRESS if set, else a LocalCluster.

    A deployment run loads the flow from its module, so the runner must be chosen at import;
    `facecurate build` overrides it per run with the catalog's and the command line's choice.
    """
    # Threads by default: the models release the GIL, and a worker process per served run would
    # only add start-up time. FACECURATE_DASK_PROCESSES=1 asks for processes.
    processes = os.environ.get("FACECURATE_DASK_PROCESSES", "0") == "1"
    threads = int(os.environ["FACECURATE_DASK_THREADS"]) if os.environ.get("FACECURATE_DASK_THREADS") else None
    if os.environ.get("FACECURATE_DASK_CUDA") == "1":
        return cuda_task_runner(threads)
    return dask_task_runner(os.environ.get("FACECURATE_DASK_ADDRESS") or None,
                            int(os.environ.get("FACECURATE_DASK_WORKERS", "1")), processes, threads=threads)
