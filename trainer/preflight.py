"""Pre-flight: what can be checked about a run before any worker starts, reported all at once with the field named.

A run that dies two phases in because a teacher checkpoint is missing, or a minute in because the disk cannot hold
the next checkpoint, wastes the time before it and (told "run the same command again") the time after. So
`stagerun run`, before it takes the run lock or tokenizes anything, and `stagerun launch`, before the rendezvous,
check: every data source and the tokenizer exist (one listing or HEAD each, nothing downloaded); the checkpoint
root is writable (a probe object is created and deleted) and, when local, has room for the checkpoints retention
needs; s3:// URLs have credentials; distillation teachers and ``spec.model.init`` exist and match the architecture;
the devices match ``gpusPerNode`` and the process count; the model's training state fits in memory.

Every check is a function returning :class:`Findings` (problems refuse the run, warnings do not); the machine's
measurements come in a :class:`Machine`, so tests can give a full disk or a GPU machine. A check that cannot reach
remote storage (a timeout) only warns: in a pod a problem fails the run for good, and a network error may pass.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stagerun.core import storage
from stagerun.core.memory_estimate import estimate_phase_memory
from stagerun.core.spec import Problem, ResolvedPhase, ResolvedRun, SpecError
from stagerun.core.spec.validate import phase_layout

from .preflight_machine import Machine, free_bytes, human_bytes

__all__ = ["Findings", "Machine", "PreflightError", "check_nproc", "free_bytes", "preflight"]

# Bytes per parameter. A checkpoint holds the fp32 weights and AdamW's two fp32 moments; training also holds the fp32
# gradients (bf16 compute copies are transient, activations are not counted: this is a floor, not an estimate).
CHECKPOINT_BYTES_PER_PARAM = 12
MEMORY_MARGIN = 0.9  # warn when the estimated peak takes more than this share of the memory a rank has
PROBE_PREFIX = ".stagerun-preflight-"


class PreflightError(SpecError):
    """Problems found before any worker started; ``problems`` names each field and its fix."""


@dataclass
class Findings:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def add(self, other: Findings) -> Findings:
        for mine, theirs in ((self.problems, other.problems), (self.warnings, other.warnings)):
            mine.extend(p for p in theirs if p not in mine)  # phases sharing a setting report it once
        return self


# --- the command line ----------------------------------------------------------------------------------------


def check_nproc(nproc: int | None) -> list[Problem]:
    if nproc is not None and nproc < 1:
        return [Problem("--nproc", f"must be at least 1, got {nproc}", "pass --nproc N with N >= 1, or leave it out")]
    return []


# --- paths and credentials -----------------------------------------------------------------------------------


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if storage.is_url(url) else "file"


def _filesystem_problem(url: str, path: str) -> Problem | None:
    """Whether fsspec can open ``url`` at all: a protocol without its package (s3fs, gcsfs) is named."""
    import fsspec

    try:
        fsspec.get_filesystem_class(_protocol(url))
    except (ImportError, ValueError) as exc:
        return Problem(path, f"{url}: cannot open this kind of URL here: {exc}", "install the package the error names")
    return None


def _s3_credentials_missing() -> str | None:
    try:
        import botocore.session  # type: ignore[import-untyped]
    except ImportError:
        return "botocore is not installed (pip install s3fs)"
    try:
        if botocore.session.Session().get_credentials() is None:
            return "no AWS credentials were found"
    except Exception as exc:  # a broken profile file, say: the message says which
        return f"the AWS credentials cannot be read: {exc}"
    return None


def check_credentials(urls: dict[str, str]) -> Findings:
    """``urls``: manifest field -> URL. s3:// needs credentials botocore can resolve; every URL needs its package."""
    found = Findings()
    for path, url in urls.items():
        problem = _filesystem_problem(url, path)
        if problem is not None:
            found.problems.append(problem)
    s3 = {path: url for path, url in urls.items() if _protocol(url) in ("s3", "s3a")}
    missing = _s3_credentials_missing() if s3 else None
    if missing:
        fields = ", ".join(s3)
        found.problems.append(
            Problem(
                fields,
                f"{missing} for {', '.join(sorted(set(s3.values())))}",
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); on Kubernetes name a Secret "
                "holding them in spec.checkpoint.credentialsSecret",
            )
        )
    return found


def _unchecked(path: str, url: str, exc: BaseException) -> Problem:
    return Problem(path, f"{url} could not be checked ({type(exc).__name__}: {exc}); going on", None)


def check_exists(path: str, url: str, *, what: str, file_only: bool = False) -> Findings:
    """``url`` (a file, folder or glob; local or fsspec) names something readable: one listing or HEAD."""
    found = Findings()
    try:
        fs, root = storage.resolve(url)
        if any(ch in url for ch in "*?["):
            if not fs.glob(root):
                found.problems.append(Problem(path, f"{url} matches no files", f"point it at {what}"))
            return found
        if not fs.exists(root):
            found.problems.append(Problem(path, f"{url} does not exist", f"point it at {what}"))
        elif file_only and fs.isdir(root):
            found.problems.append(Problem(path, f"{url} is a folder", f"point it at {what}"))
        elif storage.is_local(fs) and not os.access(root, os.R_OK | (os.X_OK if fs.isdir(root) else 0)):
            found.problems.append(Problem(path, f"{url} is not readable by this user", "fix its permissions"))
    except PermissionError as exc:
        found.problems.append(Problem(path, f"{url} cannot be read: {exc}", "grant read access to it"))
    except Exception as exc:  # storage or network trouble: preparing the data will retry or say more
        found.warnings.append(_unchecked(path, url, exc))
    return found


def check_data(run: ResolvedRun, skip: Container[str] = ()) -> Findings:
    from .data.corpora import BUILTIN_CORPORA

    found = Findings()
    for name, source in run.sources.items():
        if source.path in BUILTIN_CORPORA or source.path in skip:
            continue
        what = "a shard set, text or JSONL files (a file, folder, glob or fsspec URL)"
        found.add(check_exists(f"spec.data.sources.{name}.path", source.path, what=what))
    tokenizer = run.tokenizer.path
    if tokenizer is not None and tokenizer not in skip:
        what = "a tokenizers JSON file, or use tokenizer.train to train one"
        found.add(check_exists("spec.tokenizer.path", tokenizer, what=what, file_only=True))
    return found


# --- the checkpoint root -------------------------------------------------------------------------------------


def checkpoint_bytes(run: ResolvedRun) -> int:
    return CHECKPOINT_BYTES_PER_PARAM * run.model.parameter_count()


def check_checkpoint_root(run: ResolvedRun, root_url: str, field_path: str, machine: Machine) -> Findings:
    """Writable (a probe is created and deleted), and on local disks room for the checkpoints retention needs."""
    found = Findings()
    fix_root = f"point {field_path} at a writable location, or fix its permissions"
    created: list[Path] = []
    try:
        fs, root = storage.resolve(root_url)
        if storage.is_local(fs):  # an object store has no folders to make
            created = [p for p in (Path(root), *Path(root).parents) if not p.exists()]
            fs.makedirs(root, exist_ok=True)
        probe = storage.join(root, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        fs.pipe_file(probe, b"stagerun pre-flight probe: safe to delete")
        fs.rm_file(probe)
        _remove_empty(created)  # a refused run leaves nothing behind; a started one makes them again
    except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        found.problems.append(Problem(field_path, f"{root_url} is not writable: {exc}", fix_root))
        return found
    except OSError as exc:
        if exc.errno in (30, 28):  # EROFS, ENOSPC: said by the filesystem, not the network
            found.problems.append(Problem(field_path, f"{root_url} is not writable: {exc}", fix_root))
        else:
            found.warnings.append(_unchecked(field_path, root_url, exc))
        return found
    except Exception as exc:
        found.warnings.append(_unchecked(field_path, root_url, exc))
        return found
    found.add(_check_resumed_model(run, fs, root))
    if storage.is_local(fs):
        found.add(_check_free_space(run, fs, root, field_path, machine))
    return found


def _check_resumed_model(run: ResolvedRun, fs, root: str) -> Findings:
    """The newest committed checkpoint, which the run will resume from, holds spec.model's architecture (the
    trainer refuses it otherwise, and every rerun would again)."""
    committed = _committed(fs, root)
    if not committed:
        return Findings()
    from .checkpoint import META
    from .distill import architecture_differences

    folder = storage.join(root, committed[-1])
    try:
        changed = architecture_differences(run.model, storage.read_json(fs, storage.join(folder, META)))
    except (OSError, ValueError):
        return Findings()  # damaged: the worker falls back past it, or says why
    if changed is None:
        return Findings()
    where = storage.to_url(fs, folder)
    message = f"the run resumes from {where}, written by a different model (fields that differ: {', '.join(changed)})"
    fix = "restore those fields, or point spec.checkpoint.path elsewhere to start anew"
    return Findings(problems=[Problem("spec.model", message, fix)])


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def _committed(fs, root: str) -> list[str]:
    """The committed ``step-…`` folders under ``root``, oldest first."""
    names = sorted(n for n in storage.list_subdirs(fs, root) if n.startswith("step-"))
    if not names:
        return []
    from .checkpoint import MARKER  # torch: imported only where there are checkpoints to look at

    return [n for n in names if fs.exists(storage.join(root, n, MARKER))]


def _existing_checkpoints(fs, root: str) -> tuple[int, int]:
    """(committed checkpoints, bytes of the newest as measured when it was committed) under ``root``."""
    committed = _committed(fs, root)
    if not committed:
        return 0, 0
    from .checkpoint import MARKER

    try:
        size = int(storage.read_json(fs, storage.join(root, committed[-1], MARKER)).get("bytes", 0))
    except (ValueError, OSError, AttributeError):
        size = 0
    return len(committed), size


def _check_free_space(run: ResolvedRun, fs, root: str, field_path: str, machine: Machine) -> Findings:
    """Retention deletes old checkpoints only after a new one is committed, so keep + 1 must fit at once; those
    already on disk count as used, not needed."""
    existing, measured = _existing_checkpoints(fs, root)
    size = max(measured, checkpoint_bytes(run))
    keep = run.checkpoint.keep
    needed = max(1, keep + 1 - existing) * size
    free = machine.free_bytes(root)
    if free >= needed:
        return Findings()
    there = f" ({existing} already there)" if existing else ""
    return Findings(
        problems=[
            Problem(
                field_path,
                f"{root} has {human_bytes(free)} free, but saving needs keep + 1 = {keep + 1} checkpoints of "
                f"about {human_bytes(size)} each{there}: {human_bytes(needed)} more (retention deletes old ones "
                "only after a new one is committed)",
                f"free space there, lower spec.checkpoint.keep, or point {field_path} at a larger volume",
            )
        ]
    )


# --- teachers and released weights --------------------------------------------------------------------------


def check_teachers(run: ResolvedRun, own_root: str, skip: Container[str] = ()) -> Findings:
    """Every distilling phase's teacher exists and holds the architecture the manifest gives it (distill.py's check).

    A teacher under this run's own checkpoint root (self-distillation) appears only while the run trains: skipped."""
    found = Findings()
    for phase in run.phases:
        if phase.distill is None:
            continue
        from .distill import TeacherError, check_teacher_architecture, teacher_checkpoint, teacher_spec  # torch

        teacher, path = phase.distill.teacher, f"spec.phases[{phase.index}].distill.teacher"
        if teacher.checkpoint in skip or teacher.checkpoint.rstrip("/").startswith(own_root.rstrip("/")):
            continue
        try:
            manager, info = teacher_checkpoint(teacher.checkpoint)
            fs, folder = storage.resolve(info.path)
            meta = storage.read_json(fs, storage.join(folder, "meta.json"))
            check_teacher_architecture(info, meta, teacher_spec(teacher, run.model))
        except TeacherError as exc:
            missing = isinstance(exc, FileNotFoundError)
            where = f"{path}.checkpoint" if missing else f"{path}.model"
            message = str(exc).removeprefix("spec.phases[*].distill.teacher.checkpoint: ")  # Problem names it
            fix = "train the teacher first, or fix the path" if missing else None
            found.problems.append(Problem(where, f"phase {phase.name}: {message}", fix))
        except FileNotFoundError as exc:
            found.problems.append(Problem(f"{path}.checkpoint", f"phase {phase.name}: {exc}", "fix the path"))
        except Exception as exc:
            found.warnings.append(_unchecked(f"{path}.checkpoint", teacher.checkpoint, exc))
    return found


def check_init(run: ResolvedRun, skip: Container[str] = ()) -> Findings:
    """``spec.model.init``: the Hugging Face folder or stagerun checkpoint exists and holds the model's architecture
    (model/initial_weights.py reads config.json or meta.json, never a tensor)."""
    if run.model.init is None or run.model.init.path in skip:
        return Findings()
    from .model.initial_weights import check_initial_weights  # a Hugging Face folder or a stagerun checkpoint

    path = run.model.init.path
    try:
        check_initial_weights(run.model)
    except SpecError as exc:  # HFMismatchError, InitCheckpointError: every mismatching field, already named
        return Findings(problems=list(exc.problems))
    except FileNotFoundError as exc:
        return Findings(problems=[Problem("spec.model.init.path", str(exc), "point it at a Hugging Face model folder")])
    except Exception as exc:
        return Findings(warnings=[_unchecked("spec.model.init.path", path, exc)])
    return Findings()


# --- devices and memory --------------------------------------------------------------------------------------


def _resources_field(run: ResolvedRun, phase: ResolvedPhase, name: str) -> str:
    own = run.manifest.spec.phases[phase.index].resources is not None
    return f"spec.phases[{phase.index}].resources.{name}" if own else f"spec.resources.{name}"


def check_devices(run: ResolvedRun, phase: ResolvedPhase, processes: int, machine: Machine, *, pod: bool) -> Findings:
    """``processes``: how many this machine runs for ``phase``; with GPUs each needs its own."""
    gpus = phase.resources.gpus_per_node
    if gpus == 0:
        return Findings()
    path = _resources_field(run, phase, "gpusPerNode")
    if machine.gpus == 0:
        fix = "set gpusPerNode: 0 to train on CPU (gloo), or run on a machine with GPUs"
        return Findings(problems=[Problem(path, f"is {gpus} but this machine has no CUDA GPU", fix)])
    if processes > machine.gpus:
        fix = (
            "the pod was given fewer GPUs than it runs processes: check spec.resources.gpuResource"
            if pod
            else f"pass --nproc {machine.gpus}, or lower spec.resources (nodes x processesPerNode)"
        )
        message = (
            f"phase {phase.name} runs {processes} processes on this machine, one per GPU, but it has {machine.gpus}"
        )
        return Findings(problems=[Problem(path, message, fix)])
    return Findings()


def check_memory(run: ResolvedRun, phase: ResolvedPhase, processes: int, machine: Machine) -> Findings:
    """The phase's estimated peak per rank (core/memory_estimate.py: the model `stagerun plan` prints, activations,
    loss and any teacher or dpo reference included) against what a rank has: one GPU's memory, or on CPU the
    machine's available RAM shared by its ``processes`` ranks. Over it: a problem; within MEMORY_MARGIN of it: a
    warning (the estimate is a model, and allocators fragment)."""
    if phase_layout(phase) is None:
        return Findings()  # validation reports the layout
    per_rank = estimate_phase_memory(run, phase).total
    if phase.resources.gpus_per_node > 0 and machine.gpu_memory is not None:
        needed, available, what = per_rank, machine.gpu_memory, "GPU memory of one GPU"
    elif phase.resources.gpus_per_node > 0:
        return Findings()  # no GPU here: check_devices says so
    else:
        needed, available, what = per_rank * processes, machine.ram_available, "available RAM"
    message = (
        f"phase {phase.name}: the estimated peak of a step takes about {human_bytes(needed)} "
        f"({human_bytes(per_rank)} per rank: weights, gradients, optimizer state, activations and loss; "
        f"`stagerun plan` prints the parts) of {human_bytes(available)} {what}"
    )
    fix = (
        "shard over more ranks (more processes or nodes, fsdp: -1), add tensorParallel or contextParallel, lower "
        "microBatchSize, use activationCheckpointing: full, or use a smaller model"
    )
    if needed > available:
        return Findings(problems=[Problem("spec.model", message, fix)])
    if needed > MEMORY_MARGIN * available:
        return Findings(warnings=[Problem("spec.model", f"{message}: little margin is left", fix)])
    return Findings()


# --- all of it -----------------------------------------------------------------------------------------------


def _urls(run: ResolvedRun, root_url: str, root_field: str) -> dict[str, str]:
    urls = {f"spec.data.sources.{name}.path": s.path for name, s in run.sources.items() if storage.is_url(s.path)}
    candidates = {
        "spec.tokenizer.path": run.tokenizer.path,
        root_field: root_url,
        "spec.model.init.path": run.model.init.path if run.model.init is not None else None,
    }
    for phase in run.phases:
        if phase.distill is not None:
            candidates[f"spec.phases[{phase.index}].distill.teacher.checkpoint"] = phase.distill.teacher.checkpoint
    urls.update({path: url for path, url in candidates.items() if url is not None and storage.is_url(url)})
    return urls


def preflight(
    run: ResolvedRun,
    root_url: str,
    *,
    root_field: str = "spec.checkpoint.path",
    phases: Iterable[ResolvedPhase] | None = None,
    processes: Callable[[ResolvedPhase], int] = lambda phase: phase.world_size,
    machine: Machine | None = None,
    pod: bool = False,
) -> Findings:
    """Every check; ``phases``: those this machine will run (default: all), ``processes``: how many per phase run
    here (locally the whole world; in a pod processesPerNode)."""
    phases = list(phases if phases is not None else run.phases)
    machine = machine or Machine.this(gpus=any(phase.resources.gpus_per_node > 0 for phase in phases))
    found = Findings()
    urls = _urls(run, root_url, root_field)
    credentials = check_credentials(urls)
    found.add(credentials)
    # URLs that cannot be opened would only repeat the credentials problem, slowly (botocore retries).
    broken = {url for path, url in urls.items() if any(path in p.path for p in credentials.problems)}
    found.add(check_data(run, broken))
    if root_url not in broken:
        found.add(check_checkpoint_root(run, root_url, root_field, machine))
    found.add(check_teachers(run, root_url, broken))
    found.add(check_init(run, broken))
    for phase in phases:
        found.add(check_devices(run, phase, processes(phase), machine, pod=pod))
        found.add(check_memory(run, phase, processes(phase), machine))
    return found
