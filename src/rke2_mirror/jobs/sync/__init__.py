"""`rke2-mirror sync CONFIG.yaml`: the scheduled job.

`config` (the typed, versioned config and its loader), `lock` (one run per config and shard), `report`
(the JSON report, per release, and the node-exporter textfile), `run` (resolve, copy, write the outputs).
The names below are the job's API: callers use `rke2_mirror.jobs.sync` as one module.

No typer and no printing here: the CLI (`cli/sync.py`) passes a log callback and a Progress.
"""

import rke2_mirror.jobs.common as jobs  # noqa: F401  (the engine wiring: job.jobs.TLSOptions etc.)
from rke2_mirror.jobs.sync.config import (CONFIG_VERSION, ConfigError, CopySpec, LoadedConfig, NodeSpec, OutputsSpec,
                                          ReleaseSpec, SourcesSpec, SyncConfig, TargetSpec, load_config, parse_config,
                                          shard_path)
from rke2_mirror.jobs.sync.lock import LockHeld, SyncLock
from rke2_mirror.jobs.sync.report import (EXIT_CONFIG, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, REPORT_VERSION, ImageSet,
                                          SyncResult, build_report, read_textfile, render_textfile, split_report,
                                          summarize, write_atomic, write_textfile)
from rke2_mirror.jobs.sync.run import (check_config, check_outputs_writable, copy_options, mirror_refs,
                                       resolve_image_sets, run_sync, source_auth_file, sync, target_credentials,
                                       write_node_files)
from rke2_mirror.model.errors import InputError  # noqa: F401  (job.InputError: what the job raises)
from rke2_mirror.model.reference import RegistryURL  # noqa: F401  (job.RegistryURL: the target's type)

__all__ = ["CONFIG_VERSION", "ConfigError", "LockHeld", "SyncConfig", "LoadedConfig", "SyncLock", "SyncResult",
           "ImageSet", "parse_config", "load_config", "resolve_image_sets", "mirror_refs", "write_node_files", "run_sync",
           "sync", "split_report", "render_textfile", "read_textfile", "shard_path", "EXIT_OK", "EXIT_FAILED",
           "EXIT_CONFIG", "EXIT_LOCKED",
           # also used by scripts/release-bump and the tests
           "REPORT_VERSION", "TargetSpec", "SourcesSpec", "ReleaseSpec", "CopySpec", "OutputsSpec", "NodeSpec",
           "build_report", "summarize", "write_atomic", "write_textfile", "target_credentials", "source_auth_file",
           "copy_options", "check_outputs_writable", "check_config"]
