"""The run's state machine: a pure function from (spec, status, what is observed) to (new status, actions, events).

    Pending ─launch─► Starting ─every pod running─► Running ─job ends "complete"──────────────► Succeeded
                        │ ▲  ▲                         │   └─job ends "relaunch" (new topology)─► Starting
                        ▼ │  └── backoff elapsed, ─────┤ failure/hang/lost
       Job suspended  Queued     old pods gone         ▼
       (Kueue)                  Restarting ── restart budget spent / permanent failure ──► Failed
     spec.suspend ─► Suspending ─pods gone─► Suspended ─spec.suspend=false─► Starting (next attempt)

Starting says what keeps the gang from running (``waitingFor``: the scheduler's or the Job controller's words).
Queued is a queue's decision, not a failure: no restart is charged, and the same Job resumes when admitted.

Everything the machine needs to survive an operator restart is in the status it returns; the handlers persist it
and carry out the actions. Child objects have deterministic names per attempt, so repeating an action is harmless.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from stagerun.core.protocol import FailureReason, GangState, TerminationMessage
from stagerun.core.spec import ResolvedRun, format_count
from stagerun.core.spec.quantities import format_duration

from .observe import PERMANENT_WAITING, TRANSIENT_WAITING, Observation, PodView, timestamp
from .status import (
    FAILED,
    PENDING,
    QUEUED,
    RESTARTING,
    RUNNING,
    STARTING,
    SUCCEEDED,
    SUSPENDED,
    SUSPENDING,
    TERMINAL,
    conditions_for,
    iso,
)


@dataclass(frozen=True)
class Settings:
    backoff_base_seconds: float = 10.0  # first restart waits this long; each further one doubles it
    backoff_max_seconds: float = 300.0
    failure_grace_seconds: int = 30  # pods of a failed gang get this long to exit (they cannot checkpoint anyway)
    suspend_grace_seconds: int = 600  # pods being suspended get this long to commit a checkpoint
    force_delete_after_seconds: float = 60.0  # past its deletion time, a pod on a NotReady node is force-deleted
    image_pull_deadline_seconds: float = 300.0  # a pod failing to pull its image (or to create its container) so long


@dataclass(frozen=True)
class Launch:
    attempt: int
    phase_index: int


@dataclass(frozen=True)
class DeleteAttempt:
    attempt: int
    grace_seconds: int


@dataclass(frozen=True)
class ForceDeletePod:
    name: str


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: dict
    actions: list = field(default_factory=list)
    events: list = field(default_factory=list)


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    permanent: bool = False


def _fix_for(waiting_reason: str | None) -> str:
    if waiting_reason in ("CreateContainerConfigError", "CreateContainerError"):
        return "check the Secrets and ConfigMaps the pod reads (spec.checkpoint.credentialsSecret)"
    return "check spec.image and spec.scheduling.imagePullSecrets"


def backoff_seconds(restarts: int, settings: Settings) -> float:
    return min(settings.backoff_base_seconds * 2 ** max(restarts - 1, 0), settings.backoff_max_seconds)


class _Machine:
    def __init__(self, run: ResolvedRun, status: dict, obs: Observation, settings: Settings):
        self.run, self.spec, self.obs, self.settings = run, run.manifest.spec, obs, settings
        self.s = copy.deepcopy(status)  # nested values (pods, conditions) must not alias the observed status
        self.s.setdefault("state", PENDING)
        self.s.setdefault("attempt", 0)
        self.s.setdefault("restarts", 0)
        self.s.setdefault("phaseIndex", 0)
        self.s.setdefault("startTime", iso(obs.now))
        self.actions: list = []
        self.events: list[Event] = []

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append(Event(kind, reason, message))

    # -- transitions ---------------------------------------------------------------------------------------------
    def launch(self, phase_index: int, reason: str, message: str) -> None:
        attempt = self.s["attempt"] + 1
        phase = self.run.phases[phase_index]
        self.actions.append(Launch(attempt, phase_index))
        self.s.update(
            state=STARTING,
            attempt=attempt,
            phaseIndex=phase_index,
            phase=phase.name,
            launchedAt=iso(self.obs.now),
            startingSince=iso(self.obs.now),
            pods={},
        )
        for per_attempt in (
            "progressSeen",
            "progressUnreachableReported",
            "runningSince",
            "waitingFor",
            "containerErrorSince",
        ):
            self.s.pop(per_attempt, None)
        self.s.pop("nextLaunchAt", None)
        self.event(
            "Normal",
            reason,
            f"{message}: attempt {attempt}, phase {phase.name}, {phase.resources.nodes} "
            f"pod(s) x {phase.resources.procs_per_node} process(es)",
        )

    def finish(self, state: str, reason: str, message: str) -> None:
        self.s.update(state=state, completionTime=iso(self.obs.now), message=message)
        self.s.pop("nextLaunchAt", None)
        self.event("Normal" if state == SUCCEEDED else "Warning", reason, message)

    def fail_or_restart(self, failure: Failure) -> None:
        attempt = self.s["attempt"]
        self.s["lastFailure"] = {
            "reason": failure.reason,
            "message": failure.message,
            "attempt": attempt,
            "time": iso(self.obs.now),
        }
        self.event("Warning", failure.reason, failure.message)
        self.actions.append(DeleteAttempt(attempt, self.settings.failure_grace_seconds))
        if failure.permanent:
            self.s["failureReason"] = failure.reason
            self.finish(
                FAILED,
                failure.reason,
                f"{failure.message} (retrying cannot help; fix the cause and "
                "create the run again, it resumes from its newest checkpoint)",
            )
            return
        if self.s["restarts"] >= self.spec.max_restarts:
            self.s["failureReason"] = "RestartBudgetExhausted"
            self.finish(
                FAILED,
                "RestartBudgetExhausted",
                f"{self.s['restarts']} restarts used (spec.maxRestarts "
                f"{self.spec.max_restarts}); last failure: {failure.reason}: {failure.message}",
            )
            return
        self.s["restarts"] += 1
        delay = backoff_seconds(self.s["restarts"], self.settings)
        self.s.update(state=RESTARTING, nextLaunchAt=iso(self.obs.now + delay))
        self.event(
            "Normal",
            "RestartScheduled",
            f"restart {self.s['restarts']}/{self.spec.max_restarts} in {delay:g}s, from the newest checkpoint",
        )

    # -- observation -------------------------------------------------------------------------------------------
    def fold_progress(self) -> None:
        progress = self.obs.progress
        if progress is not None:
            self.s["progressSeen"] = True  # the gang's heartbeat is reachable: hang detection can trust it
        if progress is None or progress.step is None:
            return
        previous_phase = self.s["phaseIndex"]
        loss, tps = progress.loss, progress.tokens_per_second
        self.s.update(
            step=progress.step,
            tokensSeen=progress.tokens if progress.tokens is not None else 0,
            loss=round(loss, 4) if loss is not None else None,  # rounded: kubectl prints them raw
            tokensPerSecond=round(tps) if tps is not None else None,
        )
        if progress.last_step_at:
            self.s["lastStepTime"] = iso(progress.last_step_at)
        if progress.tokens_per_source:
            self.s["tokensPerSource"] = dict(progress.tokens_per_source)
        if progress.evaluation:  # the latest spec.phases[].eval result (held-out loss, needle accuracy)
            self.s["evaluation"] = dict(progress.evaluation)
        index = progress.phase_index
        if index is not None and index != previous_phase and 0 <= index < len(self.run.phases):
            self.event("Normal", "PhaseFinished", f"phase {self.run.phases[previous_phase].name} finished")
            self.event("Normal", "PhaseStarted", f"phase {self.run.phases[index].name} started in the same gang")
            self.s.update(phaseIndex=index, phase=self.run.phases[index].name)
        checkpoint = progress.last_checkpoint
        if checkpoint is not None and checkpoint.step != (self.s.get("lastCheckpoint") or {}).get("step"):
            self.s["lastCheckpoint"] = {
                "path": checkpoint.path,
                "step": checkpoint.step,
                "tokens": checkpoint.tokens,
                "time": iso(checkpoint.time),
            }
            self.event(
                "Normal",
                "CheckpointCommitted",
                f"checkpoint step {checkpoint.step} ({format_count(checkpoint.tokens)} tokens) at {checkpoint.path}",
            )
        tps = self.s.get("tokensPerSecond")
        if tps:
            self.s["eta"] = format_duration(max(self.run.total_tokens - self.s.get("tokensSeen", 0), 0) / tps)

    def assess_attempt(self) -> tuple[str, TerminationMessage] | Failure | None:
        """("finished", termination message) when the gang ended by itself, a Failure, or None while healthy."""
        obs, attempt = self.obs, self.s["attempt"]
        if obs.job is None and self.s["state"] == STARTING and not obs.pods:
            # The status says this attempt was launched, but its children were not all created (the operator
            # stopped between writing its intent and acting on it): carry the launch out again.
            if attempt > 1:
                self.actions.append(DeleteAttempt(attempt - 1, self.settings.failure_grace_seconds))
            self.actions.append(Launch(attempt, self.s["phaseIndex"]))
            return None
        if obs.job is None:
            return Failure("JobMissing", f"the Job of attempt {attempt} disappeared (deleted by someone else?)")
        known = self.s.setdefault("pods", {})
        current = {str(p.index): p for p in obs.pods}
        lost = next(
            (
                Failure("PodLost", f"pod {name} (index {index}) is gone: its node was lost or it was evicted")
                for index, name in known.items()
                if current.get(index) is None or current[index].name != name
            ),
            None,
        )
        # What a pod itself says (a bad image, an exit code) explains more than the teardown it causes in its peers,
        # so it is looked at first.
        erring = next((p for p in obs.pods if p.waiting_reason in TRANSIENT_WAITING), None)
        if erring is None:
            self.s.pop("containerErrorSince", None)
        else:
            since = timestamp(self.s.setdefault("containerErrorSince", iso(obs.now))) or obs.now
            if obs.now - since > self.settings.image_pull_deadline_seconds:
                return Failure(
                    erring.waiting_reason or "",
                    f"pod {erring.name} could not start its container for {format_duration(obs.now - since)}: "
                    f"{erring.waiting_reason}: {erring.waiting_message or ''}; {_fix_for(erring.waiting_reason)}",
                    permanent=True,
                )
        # A permanent cause any pod reports explains more than its peers' exits (they only lost a collective).
        for pod in sorted(obs.pods, key=lambda p: not (p.message is not None and p.message.permanent)):
            known.setdefault(str(pod.index), pod.name)
            if pod.waiting_reason in PERMANENT_WAITING:
                return Failure(
                    pod.waiting_reason,
                    f"pod {pod.name} cannot start its container: {pod.waiting_reason}; {_fix_for(pod.waiting_reason)}",
                    permanent=True,
                )
            if pod.exit_code not in (None, 0):
                return self.pod_failure(pod)
            if pod.phase == "Failed" and pod.exit_code is None:  # rejected or evicted before its container ran
                reason = pod.failed_reason or "PodFailed"
                return Failure(reason, f"pod {pod.name} failed: {reason}: {pod.failed_message or 'no message'}")
        if lost:
            return lost
        for pod in obs.pods:
            if not pod.node_ready:
                return Failure("NodeNotReady", f"the node of pod {pod.name} is not ready")
            if pod.deleting_since is not None:
                return Failure("PodLost", f"pod {pod.name} is being deleted (evicted or preempted)")
        if obs.job.failed_condition:
            return Failure("JobFailed", f"the Job of attempt {attempt} failed ({obs.job.failed_condition})")
        if obs.job.complete:
            zero = current.get("0")
            if zero is None or zero.message is None or not zero.message.state:
                return Failure(
                    "UnknownOutcome", f"the Job of attempt {attempt} completed but pod 0 left no termination message"
                )
            return ("finished", zero.message)
        if self.s["state"] != RUNNING:
            return None  # the hang clock starts when the gang runs: queueing, scheduling and pulls are not hangs
        started = timestamp(self.s.get("runningSince")) or timestamp(self.s.get("launchedAt")) or obs.now
        last_step = (obs.progress.last_step_at if obs.progress is not None else None) or 0
        quiet = obs.now - max(started, last_step)
        if quiet > self.spec.hang_timeout and not self.s.get("progressSeen"):
            # Never heard from rank 0 (an operator outside the cluster cannot reach pod IPs): silence proves nothing,
            # so say so once instead of restarting a gang that may be training fine.
            if not self.s.get("progressUnreachableReported"):
                self.s["progressUnreachableReported"] = True
                self.event(
                    "Warning",
                    "ProgressUnreachable",
                    f"rank 0's progress endpoint has not answered for "
                    f"{format_duration(quiet)}; hangs cannot be detected for this attempt (is the operator "
                    "running inside the cluster?)",
                )
            return None
        if quiet > self.spec.hang_timeout:
            where = f"after step {self.s['step']}" if self.s.get("step") is not None else "since the gang started"
            return Failure(
                "Hang",
                f"no training step completed for {format_duration(quiet)} {where} "
                f"(spec.hangTimeout {format_duration(self.spec.hang_timeout)}): restarting the gang",
            )
        return None

    def pod_failure(self, pod: PodView) -> Failure:
        message = pod.message
        if message is not None and message.permanent:
            return Failure(
                message.reason or FailureReason.INVALID_SPEC, f"pod {pod.name}: {message.message or ''}", permanent=True
            )
        if pod.terminated_reason == "OOMKilled" and self.s.get("step") is None:
            return Failure(
                "OOMKilledAtStart",
                f"pod {pod.name} ran out of memory before the first step (exit "
                f"{pod.exit_code}); lower microBatchSize, raise spec.resources.memory, or use more GPUs",
                permanent=True,
            )
        if message is not None and message.reason:  # `stagerun launch` said why, and that retrying may help
            return Failure(message.reason, f"pod {pod.name} exited with code {pod.exit_code}: {message.message or ''}")
        return Failure("PodFailed", f"pod {pod.name} exited with code {pod.exit_code} ({pod.terminated_reason})")

    def force_delete_stuck_pods(self) -> None:
        for pod in self.obs.pods:
            # A NotReady node's kubelet cannot confirm the deletion, whatever the grace period says: waiting longer
            # than force_delete_after only blocks the relaunch.
            if pod.deleting_since is None or pod.node_ready:
                continue
            down = self.obs.now - (pod.node_not_ready_since or 0.0)
            if down > self.settings.force_delete_after_seconds:
                self.actions.append(ForceDeletePod(pod.name))
                self.event(
                    "Warning",
                    "ForceDeletedPod",
                    f"pod {pod.name} was stuck terminating on a node NotReady "
                    f"for {format_duration(down)}; force-deleted so the gang can be relaunched",
                )

    # -- one step of the machine -------------------------------------------------------------------------------
    def step(self) -> None:
        state = self.s["state"]
        if state in TERMINAL:
            return
        if state in (STARTING, RUNNING):
            self.fold_progress()
        if state == PENDING:
            if not self.spec.suspend:
                self.launch(self.s["phaseIndex"], "Launched", "starting the run")
            else:
                self.s["state"] = SUSPENDED
        elif state in (STARTING, RUNNING):
            self.running()
        elif state == QUEUED:
            self.queued()
        elif state == RESTARTING and self.spec.suspend:
            # The failed attempt's teardown is under way already: wait for it as a suspension does, then stay down.
            self.s["state"] = SUSPENDING
            self.s.pop("nextLaunchAt", None)
            self.event("Normal", "Suspending", "spec.suspend is true: the restart is cancelled")
        elif state == RESTARTING:
            self.force_delete_stuck_pods()
            due = self.obs.now >= (timestamp(self.s.get("nextLaunchAt")) or 0)
            if due and not self.obs.pods and self.obs.job is None:
                restarts = self.s["restarts"]
                checkpoint = self.s.get("lastCheckpoint")
                origin = f"checkpoint step {checkpoint['step']}" if checkpoint else "the newest checkpoint"
                self.launch(self.s["phaseIndex"], "Restarted", f"restart {restarts}, resuming from {origin}")
        elif state == SUSPENDING:
            self.force_delete_stuck_pods()
            if not self.obs.pods and self.obs.job is None:
                self.s["state"] = SUSPENDED
                self.event("Normal", "Suspended", "pods stopped after a checkpoint; GPUs are free")
        elif state == SUSPENDED and not self.spec.suspend:
            self.launch(self.s["phaseIndex"], "Resumed", "resuming from the newest checkpoint")

    def suspend(self) -> None:
        self.actions.append(DeleteAttempt(self.s["attempt"], self.settings.suspend_grace_seconds))
        self.s["state"] = SUSPENDING
        self.s.pop("waitingFor", None)
        self.event("Normal", "Suspending", "spec.suspend is true: the trainer checkpoints on SIGTERM, then stops")

    def running(self) -> None:
        if self.spec.suspend:
            self.suspend()
            return
        job = self.obs.job
        if job is not None and job.suspended:
            # Before the pods are looked at: a queue's preemption deletes them, and that is no failure.
            self.s.update(state=QUEUED, pods={})
            self.s.pop("waitingFor", None)
            self.event("Normal", "Queued", f"the Job {job.name} is suspended, waiting for its queue to admit it")
            return
        outcome = self.assess_attempt()
        if outcome is None:
            if self.s["state"] == STARTING:
                self.starting()
            return
        if isinstance(outcome, Failure):
            self.fail_or_restart(outcome)
            return
        _, message = outcome
        self.fold_final(message)
        if message.state == GangState.COMPLETE:
            self.actions.append(DeleteAttempt(self.s["attempt"], self.settings.failure_grace_seconds))
            self.finish(
                SUCCEEDED,
                "Succeeded",
                f"all {len(self.run.phases)} phases done: step {message.step}, "
                f"{format_count(message.tokens or 0)} tokens",
            )
        elif message.state == GangState.RELAUNCH:
            if message.phase_index is None or not 0 <= message.phase_index < len(self.run.phases):
                self.fail_or_restart(
                    Failure("UnknownOutcome", f"pod 0 asked for a relaunch into phase index {message.phase_index}")
                )
                return
            finished = self.run.phases[self.s["phaseIndex"]].name
            self.actions.append(DeleteAttempt(self.s["attempt"], self.settings.failure_grace_seconds))
            self.event(
                "Normal",
                "PhaseFinished",
                f"phase {finished} finished at step {message.step}; the next phase needs another topology",
            )
            self.launch(message.phase_index, "PhaseStarted", "relaunching for the next phase")
        else:  # stopped without a suspend request: a preemption (node drain, SIGTERM from outside)
            self.fail_or_restart(Failure("Preempted", "the trainer was stopped from outside and checkpointed"))

    def starting(self) -> None:
        """Running once every pod of the gang runs; until then, say what the cluster says is in the way."""
        obs = self.obs
        completions = obs.job.completions if obs.job is not None else 0
        if completions and len(obs.pods) >= completions and all(p.phase == "Running" for p in obs.pods):
            self.s.update(state=RUNNING, runningSince=iso(obs.now))
            self.s.pop("waitingFor", None)
            return
        blocker = None
        unschedulable = next((p for p in obs.pods if p.unschedulable), None)
        erring = next((p for p in obs.pods if p.waiting_reason in TRANSIENT_WAITING), None)
        if erring is not None:
            blocker = {
                "reason": erring.waiting_reason or "",
                "message": f"pod {erring.name}: {erring.waiting_message or erring.waiting_reason}; the run fails if "
                f"it lasts {format_duration(self.settings.image_pull_deadline_seconds)}",
            }
        elif unschedulable is not None:
            blocker = {"reason": "Unschedulable", "message": f"pod {unschedulable.name}: {unschedulable.unschedulable}"}
        elif len(obs.pods) < completions and obs.job_warnings:
            blocker = {
                "reason": "FailedCreate",
                "message": f"the Job cannot create its pods: {obs.job_warnings[-1]}",
            }
        if blocker is None:
            self.s.pop("waitingFor", None)
        elif blocker != self.s.get("waitingFor"):
            self.s["waitingFor"] = blocker
            self.event("Warning", blocker["reason"], blocker["message"])
        timeout = self.spec.startup_timeout
        since = timestamp(self.s.get("startingSince")) or timestamp(self.s.get("launchedAt")) or obs.now
        if timeout is not None and obs.now - since > timeout:
            why = (blocker or {}).get("message") or "its pods are not all running"
            self.fail_or_restart(
                Failure(
                    "StartupTimeout",
                    f"the gang is not running {format_duration(obs.now - since)} after its start "
                    f"(spec.startupTimeout {format_duration(timeout)}): {why}",
                )
            )

    def queued(self) -> None:
        if self.spec.suspend:
            self.suspend()
            return
        job = self.obs.job
        if job is None:
            self.fail_or_restart(Failure("JobMissing", f"the queued Job of attempt {self.s['attempt']} disappeared"))
        elif not job.suspended:
            self.s.update(state=STARTING, startingSince=iso(self.obs.now))
            self.event("Normal", "Admitted", f"the queue admitted the Job {job.name}")

    def fold_final(self, message: TerminationMessage) -> None:
        if message.step is not None:
            tokens = message.tokens if message.tokens is not None else self.s.get("tokensSeen")
            self.s.update(step=message.step, tokensSeen=tokens)
        if message.checkpoint:
            self.s["lastCheckpoint"] = {
                "path": message.checkpoint,
                "step": message.step,
                "tokens": message.tokens,
                "time": iso(self.obs.now),
            }


def reconcile(run: ResolvedRun, status: dict, obs: Observation, settings: Settings = Settings()) -> Decision:
    """One level-triggered step: what the run's status should become and what to do about it."""
    machine = _Machine(run, status, obs, settings)
    machine.step()
    machine.s["conditions"] = conditions_for(machine.s, obs, obs.now)
    return Decision(machine.s, machine.actions, machine.events)
