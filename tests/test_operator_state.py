"""The operator's state machine, transition by transition, including every failure path (pure: no API)."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import ROOT

from stagerun.core.spec import resolve_run
from stagerun.operator.observe import JobView, Observation, PodView
from stagerun.operator.state import (
    FAILED,
    PENDING,
    QUEUED,
    RESTARTING,
    RUNNING,
    STARTING,
    SUCCEEDED,
    SUSPENDED,
    SUSPENDING,
    DeleteAttempt,
    ForceDeletePod,
    Launch,
    Settings,
    iso,
    reconcile,
)

NOW = 1_800_000_000.0
SETTINGS = Settings(
    backoff_base_seconds=10,
    backoff_max_seconds=300,
    failure_grace_seconds=30,
    suspend_grace_seconds=600,
    force_delete_after_seconds=60,
)


def make_run(**spec_changes):
    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["spec"].update(
        image="ghcr.io/example/stagerun:0.1",
        checkpoint={"path": "s3://bucket/quickstart"},
        **copy.deepcopy(spec_changes),
    )
    return resolve_run(manifest)


RUN = make_run()


def running_status(**extra) -> dict:
    status = {
        "state": RUNNING,
        "attempt": 1,
        "phaseIndex": 0,
        "phase": "core",
        "restarts": 0,
        "launchedAt": iso(NOW - 100),
        "pods": {"0": "quickstart-a1-0-abcde"},
    }
    status.update(extra)
    return status


def pod(name="quickstart-a1-0-abcde", index=0, phase="Running", **kw) -> PodView:
    return PodView(name=name, index=index, phase=phase, **kw)


def job(**kw) -> JobView:
    return JobView(**{"name": "quickstart-a1", "attempt": 1, "completions": 1, **kw})


_DEFAULT = object()


def obs(pods=_DEFAULT, job_view=_DEFAULT, progress=None, now=NOW) -> Observation:
    pods = (pod(),) if pods is _DEFAULT else pods
    job_view = job() if job_view is _DEFAULT else job_view
    return Observation(now=now, job=job_view, pods=tuple(pods), progress=progress)


def event_reasons(decision) -> list[str]:
    return [e.reason for e in decision.events]


def condition(decision, kind) -> dict:
    return next(c for c in decision.status["conditions"] if c["type"] == kind)


def test_pending_launches_the_first_attempt():
    d = reconcile(RUN, {}, Observation(now=NOW), SETTINGS)
    assert d.actions == [Launch(attempt=1, phase_index=0)]
    assert d.status["state"] == STARTING and d.status["attempt"] == 1 and d.status["phase"] == "core"
    assert event_reasons(d) == ["Launched"] and condition(d, "Progressing")["status"] == "True"


def test_pending_with_suspend_launches_nothing():
    d = reconcile(make_run(suspend=True), {}, Observation(now=NOW), SETTINGS)
    assert d.actions == [] and d.status["state"] == SUSPENDED and condition(d, "Suspended")["status"] == "True"


def test_healthy_gang_changes_nothing_and_is_ready():
    d = reconcile(RUN, running_status(), obs(), SETTINGS)
    assert d.actions == [] and d.status["state"] == RUNNING
    assert condition(d, "Ready")["status"] == "True"


def test_progress_is_folded_into_status_with_checkpoint_and_phase_events():
    progress = {
        "step": 40,
        "tokens": 491_520,
        "loss": 6.2,
        "tokensPerSecond": 5000.0,
        "phaseIndex": 1,
        "tokensPerSource": {"docs": 344_064, "code": 147_456},
        "lastStepAt": NOW - 1,
        "lastCheckpoint": {"path": "s3://b/step-40", "step": 40, "tokens": 491_520, "time": NOW - 2},
    }
    d = reconcile(RUN, running_status(), obs(progress=progress), SETTINGS)
    s = d.status
    assert (s["step"], s["tokensSeen"], s["loss"], s["tokensPerSecond"]) == (40, 491_520, 6.2, 5000)
    assert s["phase"] == "long-context" and s["phaseIndex"] == 1
    assert s["lastCheckpoint"]["step"] == 40 and s["eta"]
    assert s["tokensPerSource"] == {"docs": 344_064, "code": 147_456}
    assert {"CheckpointCommitted", "PhaseFinished", "PhaseStarted"} <= set(event_reasons(d))
    again = reconcile(RUN, s, obs(progress=progress), SETTINGS)
    assert "CheckpointCommitted" not in event_reasons(again)  # only new checkpoints make events


def test_failed_pod_schedules_a_restart_with_backoff():
    failed = pod(phase="Failed", exit_code=1, terminated_reason="Error")
    d = reconcile(RUN, running_status(), obs(pods=[failed]), SETTINGS)
    assert d.actions == [DeleteAttempt(attempt=1, grace_seconds=30)]
    assert d.status["state"] == RESTARTING and d.status["restarts"] == 1
    assert d.status["nextLaunchAt"] == iso(NOW + 10)
    assert (
        d.status["lastFailure"]["reason"] == "PodFailed" and "exited with code 1" in d.status["lastFailure"]["message"]
    )
    assert event_reasons(d) == ["PodFailed", "RestartScheduled"]


def test_backoff_doubles_and_is_capped():
    status = running_status(restarts=3)
    d = reconcile(RUN, status, obs(pods=[pod(phase="Failed", exit_code=1)]), SETTINGS)
    assert d.status["nextLaunchAt"] == iso(NOW + 80)  # 4th restart: 10 * 2^3
    d = reconcile(
        make_run(maxRestarts=100), running_status(restarts=20), obs(pods=[pod(phase="Failed", exit_code=1)]), SETTINGS
    )
    assert d.status["nextLaunchAt"] == iso(NOW + 300)


def test_restarting_waits_for_backoff_and_for_old_pods_then_relaunches_from_checkpoint():
    status = running_status(
        state=RESTARTING,
        restarts=1,
        nextLaunchAt=iso(NOW + 5),
        lastCheckpoint={"path": "s3://b/step-16", "step": 16, "tokens": 1, "time": iso(NOW)},
    )
    assert reconcile(RUN, status, Observation(now=NOW), SETTINGS).actions == []  # backoff not over
    old = pod(phase="Running", deleting_since=NOW)
    assert reconcile(RUN, status, obs(pods=[old], job_view=None, now=NOW + 6), SETTINGS).actions == []  # still exiting
    d = reconcile(RUN, status, Observation(now=NOW + 6), SETTINGS)
    assert d.actions == [Launch(attempt=2, phase_index=0)] and d.status["state"] == STARTING
    assert d.status["pods"] == {} and "checkpoint step 16" in d.events[0].message and event_reasons(d) == ["Restarted"]


def test_restart_budget_exhausted_fails_the_run():
    d = reconcile(
        make_run(maxRestarts=2), running_status(restarts=2), obs(pods=[pod(phase="Failed", exit_code=1)]), SETTINGS
    )
    assert d.status["state"] == FAILED and d.status["failureReason"] == "RestartBudgetExhausted"
    assert condition(d, "Failed")["status"] == "True" and "spec.maxRestarts 2" in condition(d, "Failed")["message"]
    assert d.actions == [DeleteAttempt(1, 30)]


@pytest.mark.parametrize(
    "bad_pod,reason",
    [
        (pod(phase="Pending", waiting_reason="InvalidImageName"), "InvalidImageName"),
        (
            pod(
                phase="Failed",
                exit_code=2,
                message={
                    "state": "failed",
                    "reason": "InvalidSpec",
                    "permanent": True,
                    "message": "spec.phases[1].seqLen: ...",
                },
            ),
            "InvalidSpec",
        ),
        (pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled"), "OOMKilledAtStart"),
    ],
)
def test_failures_that_would_repeat_fail_at_once_with_an_actionable_condition(bad_pod, reason):
    d = reconcile(RUN, running_status(), obs(pods=[bad_pod]), SETTINGS)
    assert d.status["state"] == FAILED and d.status["restarts"] == 0
    failed = condition(d, "Failed")
    assert failed["status"] == "True" and failed["reason"] == reason and "retrying cannot help" in failed["message"]


def test_out_of_memory_after_training_started_is_retried():
    d = reconcile(
        RUN,
        running_status(step=100),
        obs(pods=[pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled")]),
        SETTINGS,
    )
    assert d.status["state"] == RESTARTING


@pytest.mark.parametrize(
    "observed,reason",
    [
        (obs(pods=[]), "PodLost"),  # the pod we saw is gone
        (obs(pods=[pod(name="quickstart-a1-0-zzzzz")]), "PodLost"),  # replaced by the job controller
        (obs(pods=[pod(deleting_since=NOW - 1)]), "PodLost"),  # evicted
        (obs(pods=[pod(node_ready=False)]), "NodeNotReady"),
        (obs(job_view=None), "JobMissing"),
        (obs(job_view=job(failed_condition="BackoffLimitExceeded")), "JobFailed"),
        (obs(job_view=job(complete=True, succeeded=1), pods=[pod(phase="Succeeded", exit_code=0)]), "UnknownOutcome"),
    ],
)
def test_every_gang_failure_restarts(observed, reason):
    d = reconcile(RUN, running_status(), observed, SETTINGS)
    assert d.status["state"] == RESTARTING and d.status["lastFailure"]["reason"] == reason


def test_no_step_for_hang_timeout_restarts_the_gang():
    run = make_run(hangTimeout="10m")
    quiet = running_status(launchedAt=iso(NOW - 3600), step=50)
    d = reconcile(run, quiet, obs(progress={"step": 50, "lastStepAt": NOW - 601}), SETTINGS)
    assert d.status["state"] == RESTARTING and d.status["lastFailure"]["reason"] == "Hang"
    assert "no training step completed for 10m1s after step 50" in d.status["lastFailure"]["message"]
    alive = reconcile(run, quiet, obs(progress={"step": 51, "lastStepAt": NOW - 30}), SETTINGS)
    assert alive.status["state"] == RUNNING
    starting = reconcile(run, running_status(launchedAt=iso(NOW - 601)), obs(progress={"state": "starting"}), SETTINGS)
    assert starting.status["lastFailure"]["reason"] == "Hang"  # stuck before the first step counts too


def test_silence_from_an_unreachable_progress_endpoint_warns_but_never_restarts():
    run = make_run(hangTimeout="10m")
    d = reconcile(run, running_status(launchedAt=iso(NOW - 3600)), obs(progress=None), SETTINGS)
    assert d.status["state"] == RUNNING and d.actions == [] and event_reasons(d) == ["ProgressUnreachable"]
    again = reconcile(run, d.status, obs(progress=None, now=NOW + 10), SETTINGS)
    assert again.events == []  # said once per attempt
    heard = reconcile(run, d.status, obs(progress={"step": 3, "lastStepAt": NOW - 700}, now=NOW + 20), SETTINGS)
    assert heard.status["lastFailure"]["reason"] == "Hang"  # once heard from, silence is a hang


def test_stuck_terminating_pod_on_a_not_ready_node_is_force_deleted():
    # Its deletion deadline (now + a 600 s grace period) is irrelevant: the node has been down for 61 s.
    stuck = pod(deleting_since=NOW + 540, node_ready=False, node_not_ready_since=NOW - 61)
    status = running_status(state=RESTARTING, restarts=1, nextLaunchAt=iso(NOW - 1))
    d = reconcile(RUN, status, obs(pods=[stuck], job_view=None), SETTINGS)
    assert d.actions == [ForceDeletePod(stuck.name)] and event_reasons(d) == ["ForceDeletedPod"]
    young = pod(deleting_since=NOW, node_ready=False, node_not_ready_since=NOW - 10)
    assert reconcile(RUN, status, obs(pods=[young], job_view=None), SETTINGS).actions == []
    healthy_node = pod(deleting_since=NOW - 600, node_ready=True)
    assert reconcile(RUN, status, obs(pods=[healthy_node], job_view=None), SETTINGS).actions == []


def test_completed_job_with_complete_message_succeeds():
    done = pod(
        phase="Succeeded",
        exit_code=0,
        message={"state": "complete", "step": 59, "tokens": 802_816, "checkpoint": "s3://b/step-59"},
    )
    d = reconcile(RUN, running_status(), obs(pods=[done], job_view=job(complete=True, succeeded=1)), SETTINGS)
    assert d.status["state"] == SUCCEEDED and d.status["step"] == 59 and d.status["completionTime"]
    assert condition(d, "Succeeded")["status"] == "True" and condition(d, "Progressing")["status"] == "False"
    assert d.status["lastCheckpoint"]["path"] == "s3://b/step-59"


def test_phase_boundary_with_new_topology_launches_the_next_attempt():
    message = {"state": "relaunch", "step": 42, "tokens": 524_288, "phaseIndex": 1, "checkpoint": "s3://b/step-42"}
    done = pod(phase="Succeeded", exit_code=0, message=message)
    d = reconcile(RUN, running_status(), obs(pods=[done], job_view=job(complete=True, succeeded=1)), SETTINGS)
    assert d.actions == [DeleteAttempt(1, 30), Launch(attempt=2, phase_index=1)]
    assert d.status["state"] == STARTING and d.status["phase"] == "long-context" and d.status["restarts"] == 0
    assert event_reasons(d) == ["PhaseFinished", "PhaseStarted"]


def test_stopped_without_suspend_is_a_preemption_restart():
    message = {"state": "stopped", "step": 10}
    d = reconcile(
        RUN,
        running_status(),
        obs(pods=[pod(phase="Succeeded", exit_code=0, message=message)], job_view=job(complete=True, succeeded=1)),
        SETTINGS,
    )
    assert d.status["state"] == RESTARTING and d.status["lastFailure"]["reason"] == "Preempted"


def test_suspend_and_resume():
    run = make_run(suspend=True)
    d = reconcile(run, running_status(), obs(), SETTINGS)
    assert d.actions == [DeleteAttempt(1, 600)] and d.status["state"] == SUSPENDING
    waiting = reconcile(run, d.status, obs(pods=[pod(deleting_since=NOW)], job_view=None), SETTINGS)
    assert waiting.status["state"] == SUSPENDING
    gone = reconcile(run, d.status, Observation(now=NOW + 30), SETTINGS)
    assert gone.status["state"] == SUSPENDED and event_reasons(gone) == ["Suspended"]
    assert condition(gone, "Suspended")["status"] == "True" and condition(gone, "Ready")["status"] == "False"
    resumed = reconcile(RUN, gone.status, Observation(now=NOW + 60), SETTINGS)
    assert resumed.actions == [Launch(attempt=2, phase_index=0)] and event_reasons(resumed) == ["Resumed"]
    assert resumed.status["restarts"] == 0


@pytest.mark.parametrize("state", [SUCCEEDED, FAILED])
def test_terminal_states_do_nothing(state):
    d = reconcile(RUN, running_status(state=state), obs(pods=[pod(phase="Failed", exit_code=1)]), SETTINGS)
    assert d.actions == [] and d.events == [] and d.status["state"] == state


def test_condition_transition_time_only_moves_when_status_flips():
    first = reconcile(RUN, running_status(), obs(), SETTINGS)
    later = reconcile(RUN, first.status, obs(now=NOW + 100), SETTINGS)
    assert condition(later, "Ready")["lastTransitionTime"] == condition(first, "Ready")["lastTransitionTime"]
    failed = reconcile(RUN, later.status, obs(pods=[pod(phase="Failed", exit_code=1)], now=NOW + 200), SETTINGS)
    assert condition(failed, "Ready")["lastTransitionTime"] == iso(NOW + 200)


def test_pending_state_default_is_explicit():
    assert reconcile(RUN, {"state": PENDING}, Observation(now=NOW), SETTINGS).status["attempt"] == 1


def test_a_transient_failure_reported_by_launch_restarts_with_its_reason():
    message = {
        "state": "failed",
        "reason": "DataPreparationError",
        "permanent": False,
        "message": "ConnectionResetError: [Errno 104] Connection reset by peer",
    }
    d = reconcile(RUN, running_status(), obs(pods=[pod(phase="Failed", exit_code=1, message=message)]), SETTINGS)
    assert d.status["state"] == RESTARTING and d.status["lastFailure"]["reason"] == "DataPreparationError"
    assert "Connection reset by peer" in d.status["lastFailure"]["message"]


def test_a_relaunch_message_without_a_usable_phase_index_restarts_instead_of_crashing():
    for message in ({"state": "relaunch", "step": 42}, {"state": "relaunch", "step": 42, "phaseIndex": 9}):
        done = pod(phase="Succeeded", exit_code=0, message=message)
        d = reconcile(RUN, running_status(), obs(pods=[done], job_view=job(complete=True, succeeded=1)), SETTINGS)
        assert d.status["state"] == RESTARTING and d.status["lastFailure"]["reason"] == "UnknownOutcome"


# -- Starting and Queued ---------------------------------------------------------------------------------------
def starting_status(**extra) -> dict:
    return running_status(state=STARTING, pods={}, **extra)


def test_starting_becomes_running_when_every_pod_of_the_gang_runs():
    two = job(completions=2)
    first = pod("quickstart-a1-0-abcde", 0)
    d = reconcile(RUN, starting_status(), obs(pods=[first], job_view=two), SETTINGS)
    assert d.status["state"] == STARTING  # one of two pods
    second = pod("quickstart-a1-1-fghij", 1)
    d = reconcile(RUN, d.status, obs(pods=[first, second], job_view=two, now=NOW + 5), SETTINGS)
    assert d.status["state"] == RUNNING and d.status["runningSince"] == iso(NOW + 5)
    assert condition(d, "Ready")["status"] == "True"


def test_the_hang_clock_starts_when_the_gang_runs_not_at_launch():
    pending = pod(phase="Pending")
    late = NOW + RUN.manifest.spec.hang_timeout + 60  # launched long ago, still pulling images
    d = reconcile(RUN, starting_status(launchedAt=iso(NOW)), obs(pods=[pending], now=late), SETTINGS)
    assert d.status["state"] == STARTING and "Hang" not in event_reasons(d)
    d = reconcile(RUN, d.status, obs(now=late + 1), SETTINGS)  # running now: the clock starts here
    assert d.status["state"] == RUNNING and "Hang" not in event_reasons(d)


def test_an_unschedulable_gang_says_why_once():
    stuck = pod(phase="Pending", unschedulable="0/4 nodes are available: 4 Insufficient cpu.")
    d = reconcile(RUN, starting_status(), obs(pods=[stuck]), SETTINGS)
    assert d.status["state"] == STARTING and d.status["waitingFor"]["reason"] == "Unschedulable"
    ready = condition(d, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Unschedulable" and "Insufficient cpu" in ready["message"]
    assert event_reasons(d) == ["Unschedulable"]
    again = reconcile(RUN, d.status, obs(pods=[stuck], now=NOW + 10), SETTINGS)
    assert event_reasons(again) == []  # said once, not every reconcile


def test_pods_the_job_cannot_create_are_reported_with_the_controllers_words():
    words = 'pods "quickstart-a1-0-x" is forbidden: exceeded quota: no-pods'
    observed = Observation(now=NOW, job=job(), pods=(), job_warnings=("older", words))
    d = reconcile(RUN, starting_status(), observed, SETTINGS)
    assert d.status["state"] == STARTING and d.actions == []
    assert condition(d, "Ready")["reason"] == "FailedCreate" and words in condition(d, "Ready")["message"]


def test_a_suspended_job_is_queued_without_spending_a_restart_and_resumes_when_admitted():
    held = job(suspended=True)
    d = reconcile(RUN, starting_status(), obs(pods=[], job_view=held), SETTINGS)
    assert d.status["state"] == QUEUED and d.actions == [] and event_reasons(d) == ["Queued"]
    # Preempted while running: the Job controller deletes the pods; that is the queue's decision, no failure.
    deleting = pod(deleting_since=NOW - 1)
    d = reconcile(RUN, running_status(), obs(pods=[deleting], job_view=held), SETTINGS)
    assert d.status["state"] == QUEUED and d.status["restarts"] == 0 and d.status["pods"] == {}
    d = reconcile(RUN, d.status, obs(pods=[], job_view=held, now=NOW + 60), SETTINGS)
    assert d.status["state"] == QUEUED and d.actions == []
    admitted = pod("quickstart-a1-0-zzzzz")  # the same Job, new pods
    d = reconcile(RUN, d.status, obs(pods=[admitted], job_view=job(), now=NOW + 90), SETTINGS)
    assert d.status["state"] == STARTING and event_reasons(d) == ["Admitted"]
    d = reconcile(RUN, d.status, obs(pods=[admitted], now=NOW + 91), SETTINGS)
    assert d.status["state"] == RUNNING and d.status["restarts"] == 0


def test_suspend_while_queued_suspends():
    d = reconcile(make_run(suspend=True), running_status(state=QUEUED), obs(pods=[], job_view=job(suspended=True)))
    assert d.status["state"] == SUSPENDING and d.actions == [DeleteAttempt(1, Settings().suspend_grace_seconds)]


def test_suspend_while_restarting_cancels_the_restart():
    restarting = running_status(state=RESTARTING, restarts=1, nextLaunchAt=iso(NOW - 1))
    d = reconcile(make_run(suspend=True), restarting, obs(pods=[], job_view=None), SETTINGS)
    assert d.status["state"] == SUSPENDING and d.actions == [] and "nextLaunchAt" not in d.status
    d = reconcile(make_run(suspend=True), d.status, obs(pods=[], job_view=None, now=NOW + 1), SETTINGS)
    assert d.status["state"] == SUSPENDED and d.actions == []
    resumed = reconcile(make_run(), d.status, obs(pods=[], job_view=None, now=NOW + 2), SETTINGS)
    assert resumed.actions == [Launch(attempt=2, phase_index=0)] and resumed.status["restarts"] == 1


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError"])
def test_a_container_error_is_waited_out_up_to_its_deadline_then_fails_the_run(reason):
    erring = pod(phase="Pending", waiting_reason=reason, waiting_message="rpc error: not found")
    d = reconcile(RUN, starting_status(), obs(pods=[erring]), SETTINGS)
    assert d.status["state"] == STARTING and d.actions == [] and condition(d, "Ready")["reason"] == reason
    assert "rpc error: not found" in condition(d, "Ready")["message"]
    later = reconcile(RUN, d.status, obs(pods=[erring], now=NOW + SETTINGS.image_pull_deadline_seconds - 1), SETTINGS)
    assert later.status["state"] == STARTING  # a registry hiccup passes
    ok = reconcile(RUN, later.status, obs(now=NOW + SETTINGS.image_pull_deadline_seconds - 0.5), SETTINGS)
    assert ok.status["state"] == RUNNING and "containerErrorSince" not in ok.status
    # Lasting past the deadline, it fails the run at once (a restart would meet the same error), with the fix.
    stuck = reconcile(RUN, later.status, obs(pods=[erring], now=NOW + SETTINGS.image_pull_deadline_seconds + 1))
    assert stuck.status["state"] == FAILED and stuck.status["restarts"] == 0
    assert condition(stuck, "Failed")["reason"] == reason and "rpc error: not found" in stuck.status["message"]


def test_a_pod_that_failed_before_its_container_ran_restarts_the_gang():
    evicted = pod(phase="Failed", failed_reason="OutOfnvidia.com/gpu", failed_message="Node didn't have enough")
    d = reconcile(RUN, running_status(), obs(pods=[evicted]), SETTINGS)
    assert d.status["state"] == RESTARTING and d.status["lastFailure"]["reason"] == "OutOfnvidia.com/gpu"
    assert "Node didn't have enough" in d.status["lastFailure"]["message"]


def test_a_starting_attempt_without_its_job_is_launched_again_not_charged():
    """The operator writes its intent (attempt 2, Starting) before creating the children; if it stopped in between,
    the next reconcile carries the launch out (idempotent creates; the previous attempt deleted again)."""
    launched = running_status(state=STARTING, attempt=2, pods={})
    d = reconcile(RUN, launched, obs(pods=[], job_view=None), SETTINGS)
    assert d.actions == [DeleteAttempt(1, 30), Launch(attempt=2, phase_index=0)]
    assert d.status["state"] == STARTING and d.status["restarts"] == 0 and event_reasons(d) == []


def test_a_gang_not_running_within_the_startup_timeout_is_restarted_with_the_reason():
    run = make_run(startupTimeout="10m")
    stuck = pod(phase="Pending", unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")
    starting = starting_status(launchedAt=iso(NOW), startingSince=iso(NOW))
    d = reconcile(run, starting, obs(pods=[stuck], now=NOW + 599), SETTINGS)
    assert d.status["state"] == STARTING
    d = reconcile(run, d.status, obs(pods=[stuck], now=NOW + 601), SETTINGS)
    assert d.status["state"] == RESTARTING and d.status["lastFailure"]["reason"] == "StartupTimeout"
    assert "Insufficient nvidia.com/gpu" in d.status["lastFailure"]["message"] and d.actions == [DeleteAttempt(1, 30)]
    # Without spec.startupTimeout a gang waits as long as it takes (e.g. for a cluster autoscaler).
    waiting = reconcile(RUN, starting, obs(pods=[stuck], now=NOW + 10 * 86400), SETTINGS)
    assert waiting.status["state"] == STARTING


def test_the_startup_clock_restarts_when_a_queue_admits_the_job():
    run = make_run(startupTimeout="10m")
    queued = running_status(state=QUEUED, launchedAt=iso(NOW), startingSince=iso(NOW))
    d = reconcile(run, queued, obs(pods=[], job_view=job(), now=NOW + 3600), SETTINGS)  # admitted an hour later
    assert d.status["state"] == STARTING and d.status["startingSince"] == iso(NOW + 3600)
    d = reconcile(run, d.status, obs(pods=[pod(phase="Pending")], now=NOW + 3660), SETTINGS)
    assert d.status["state"] == STARTING


def test_which_job_changes_reconcile_a_run_at_once():
    from stagerun.operator.observe import job_change_matters

    assert not job_change_matters({"metadata": {}, "status": {"active": 2, "ready": 1}})  # pods starting: the timer
    assert job_change_matters({"metadata": {}, "status": {"active": 1, "failed": 1}})  # a pod failed or was lost
    assert job_change_matters({"metadata": {"deletionTimestamp": "2026-12-01T00:00:00Z"}, "status": {}})
    for kind in ("Complete", "Failed", "Suspended"):
        assert job_change_matters({"metadata": {}, "status": {"conditions": [{"type": kind, "status": "True"}]}})
