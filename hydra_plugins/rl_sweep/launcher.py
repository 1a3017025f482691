"""rl-train's Hydra launcher (`hydra/launcher=rl_sweep`, the default in configs/config.yaml): it hands a multirun's
whole job list to `rl.sweep`, which runs the jobs at once, instead of one after another as Hydra's basic launcher
does. Each job's folder gets Hydra's usual .hydra/ (config.yaml, hydra.yaml, overrides.yaml)."""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in sys.modules,
# where dataclasses look string annotations up.
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


@dataclass
class SweepLauncherConf:
    _target_: str = "hydra_plugins.rl_sweep.launcher.SweepLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="rl_sweep", node=SweepLauncherConf)


class SweepLauncher(Launcher):
    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config  # the task function is rl.train's, run per job there

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from rl.config import load
        from rl.sweep import Job, run_sweep

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        jobs, returns = [], []
        for index, overrides in enumerate(job_overrides, initial_job_idx):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = index
            HydraConfig.instance().set_config(config)
            folder = Path(config.hydra.sweep.dir, str(config.hydra.sweep.subdir)).absolute()
            with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
                config.hydra.runtime.output_dir = str(folder)
            HydraConfig.instance().set_config(config)  # what ${hydra:runtime.output_dir} reads as the job loads
            task = copy.deepcopy(config)
            with read_write(task), open_dict(task):
                del task["hydra"]
            (folder / ".hydra").mkdir(parents=True, exist_ok=True)
            for name, part in (("config", task), ("hydra", config.hydra), ("overrides", config.hydra.overrides.task)):
                OmegaConf.save(part, folder / ".hydra" / f"{name}.yaml")
            jobs.append(Job(overrides=filter_overrides(list(overrides)), config=load(task)))
            returns.append(JobReturn(overrides=list(overrides), cfg=task, hydra_cfg=config, working_dir=str(folder),
                                     task_name=config.hydra.job.name))
        run_sweep(jobs, Path(self.config.hydra.sweep.dir).absolute())
        for job, result in zip(jobs, returns, strict=True):
            result.status = JobStatus.FAILED if job.error else JobStatus.COMPLETED
            result.return_value = RuntimeError(job.error) if job.error else job.history
        return returns
