"""Following the job a Ctrl-C (or SIGTERM handled as one) inside the call that starts it
may have left: the call may have started the job with its answer unread, so nothing would
name or cancel it. Used by the CLI's job commands and by ``build_report``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ._client import REQUEST_ID_CAPABILITY, REQUESTED_AGAIN_CAPABILITY
from ._errors import ExplaindError, FailedPreconditionError, InvalidArgumentError
from ._neuroinspect import NeuronRanking
from ._operations import cancel_outcome

if TYPE_CHECKING:
    from ._client import Client
    from ._operations import Operation

_Started = TypeVar("_Started", bound="Operation[Any] | NeuronRanking")  # what the start returns: a job, or a ranking answered inline

# Seconds the search for the job an interrupted start may have left (:func:`started_job`)
# runs before saying what it waits on: against a server restarting, each of its calls may
# take the client's timeout, and the Ctrl-C had seemed ignored.
INTERRUPTED_START_WORDS_S = 1.0
# The interrupts whose job :func:`started_job` is looking for now, or whose cleanup is
# otherwise under way (:func:`following`; the CLI's main thread's: one at a time), for words
# that cannot wait for it to end (:func:`interrupt_being_followed`).
_followed: list[KeyboardInterrupt] = []
# Seconds (at most; the client's timeout if less) that a ranking's start, interrupted, gets
# when sent again to find its job (:func:`followed_ranking`): the server answers a job's at
# once, but runs a small set's ranking inline again in full (seconds, minutes with
# stability resamples), which that call stops. Those seconds of a server thread are spent
# for nothing, yet no request avoids them: none finds a job by its request_id without
# running the request, and the same start as an operation (never inline) would, for a set
# answered inline, start a job only to cancel it, which an idle worker starts before the
# cancel reaches it: work too, and waiting for it to end (REPEATED_JOB_END_WAIT_S) to delete it.
RANKING_REPEAT_TIMEOUT_S = 5.0
# Seconds (at most) that a job the start sent again made itself (no job was kept under the
# request_id) is waited for to end once cancelled, to delete it: an idle worker starts it
# before the cancel reaches it, and it ends at its next check (a step, a batch: well under
# this, but an edit's epoch may be longer, and it then stays listed, CANCELLED).
REPEATED_JOB_END_WAIT_S = 2.0


def started_job(client: Client, start: Callable[[str], _Started], request_id: str | None = None, *, started_by: str,
                rerun_hint: bool = True, repeat: Callable[[str], _Started] | None = None) -> _Started:
    """The job ``start(request_id)`` (the SDK call that starts it) starts, under
    ``request_id``, else a new UUID chosen here rather than by the SDK, so that a Ctrl-C or
    SIGTERM landing inside the call can be followed to the job: the same request again
    under that id gets the job (or starts it now, the interrupted call not having reached
    the server: one the server says so of is deleted once it has ended cancelled), which
    is cancelled and named as the interrupt's ``operation``, unless the server says another
    run asked for it under that id too (``requested_by_another_run``): named, it goes on.
    Where that repeat fails, the
    interrupt's notes give the id to find the job by (``rerun_hint``: as the same CLI
    command with ``--request-id``).
    ``repeat``: the start to send again, if not ``start`` itself (a ranking's, bounded: one
    answered inline would run again in full). ``started_by``: who started it, in the words
    printed to stderr should the search outlast a second ("this command", "the report")."""
    given, request_id = request_id is not None, request_id or str(uuid.uuid4())
    try:
        return start(request_id)
    except KeyboardInterrupt as interrupt:
        saying = threading.Timer(INTERRUPTED_START_WORDS_S, print, (f"interrupted: looking for the job {started_by} may have started, to cancel it "
                                                                    "(a second Ctrl-C stops looking)",), {"file": sys.stderr, "flush": True})
        saying.daemon = True
        saying.start()
        try:
            with following(interrupt):
                cancel_interrupted_start(interrupt, client, request_id, repeat or start, rerun_hint=rerun_hint, given=given)
        finally:  # forgotten first: a second Ctrl-C may land in calling the words off
            saying.cancel()
        raise


@contextlib.contextmanager
def following(interrupt: KeyboardInterrupt) -> Iterator[None]:
    """Make ``interrupt`` :func:`interrupt_being_followed` while the cleanup it began runs
    (the search for its start's job, the report's wait for its cancelled edit): a SIGTERM
    landing there, should the command then not end in time, exits saying its notes."""
    _followed.append(interrupt)
    try:
        yield
    finally:
        _followed.remove(interrupt)


def interrupt_being_followed() -> KeyboardInterrupt | None:
    """The interrupt whose job :func:`started_job` is looking for now, or whose cleanup is
    otherwise under way (:func:`following`; None: none), for a SIGTERM landing there (the
    CLI's), whose exit, should the command not end in time, says what that interrupt left:
    meanwhile its notes name the request_id, or the job once found, and its ``operation``
    is that job."""
    return _followed[-1] if _followed else None


def cancel_interrupted_start(interrupt: KeyboardInterrupt, client: Client, request_id: str, start: Callable[[str], Operation[Any] | NeuronRanking], *,
                             rerun_hint: bool = True, given: bool = True) -> None:
    """Cancel the job an ``interrupt`` in ``start(request_id)`` may have left started (see
    :func:`started_job`), saying on ``interrupt`` what became of it. A second Ctrl-C here
    stops the search, not the words (a second SIGTERM raises nothing: the first's bound runs).
    While it runs, a last note says what an exit cutting it short leaves (see
    :func:`interrupt_being_followed`), in place of the words it ends with. ``given``:
    whether ``request_id`` is the caller's (--request-id), which a run again would reuse."""
    meanwhile: list[str] = []  # that last note, if any

    def say_meanwhile(note: str | None) -> None:
        if note is not None:  # added before the old one goes, so a stuck exit reading the notes between finds one
            interrupt.add_note(note)
        for said in meanwhile:
            interrupt.__notes__.remove(said)
        meanwhile[:] = [] if note is None else [note]

    say_meanwhile(f"a job may have started under request_id {request_id}, looked for to cancel it, which was cut short: explaind operations list shows it, and explaind "
                  "operations cancel NAME stops it")
    try:
        _cancel_interrupted_start(interrupt, client, request_id, start, rerun_hint, given, say_meanwhile)
    finally:
        say_meanwhile(None)


def _cancel_interrupted_start(interrupt: KeyboardInterrupt, client: Client, request_id: str, start: Callable[[str], Operation[Any] | NeuronRanking],
                              rerun_hint: bool, given: bool, say_meanwhile: Callable[[str | None], None]) -> None:
    """:func:`cancel_interrupted_start`'s search, ``say_meanwhile`` keeping its note of what
    an exit cutting it short leaves."""
    maybe_started = f"a job may have started under request_id {request_id}"
    try:
        capabilities = client.model_metadata().capabilities
        if REQUEST_ID_CAPABILITY not in capabilities:  # a repeat would start a second job
            interrupt.add_note(f"{maybe_started}, which this server keeps no record of: explaind operations list shows it")
            return
        operation = start(request_id)
    except (ExplaindError, KeyboardInterrupt) as error:  # e.g. the server gone: the interrupt is still what happened
        # --request-id another request's, or one whose job was deleted (FAILED_PRECONDITION): refused again, as the start was.
        if isinstance(error, (InvalidArgumentError, FailedPreconditionError)) and error.field == "request_id":
            interrupt.add_note(f"no job started under request_id {request_id} ({error})")
            return
        why = "interrupted again" if isinstance(error, KeyboardInterrupt) else error
        find = (f"this command again with --request-id {request_id} --no-wait names it (starting it if none did)" if rerun_hint
                else "explaind operations list shows it")
        interrupt.add_note(f"{maybe_started}, not found ({why}): {find}, and explaind operations cancel NAME stops it")
        return
    if isinstance(operation, NeuronRanking):  # a ranking the server answers inline: it started no job
        interrupt.add_note(f"no job started under request_id {request_id}: the server answers it inline")
        return
    # A server that says whether a start's answer is an earlier request's operation (its answer's own, before a cancel's
    # answer replaces it) tells the job the repeat itself started: none was kept under the id, as where the interrupt came
    # before the server had the start (the channel still connecting, say), or a small set's ranking was answered inline.
    started_by_repeat = REQUESTED_AGAIN_CAPABILITY in capabilities and not operation.metadata.requested_again
    # The start sent again found its own first attempt's job: like the SDK's retry of a start whose answer was lost,
    # that says nothing of an earlier run's (the first attempt's answer, which would have, is lost).
    operation._requested_again = False
    interrupt.operation = operation  # type: ignore[attr-defined]  # as the SDK's result() names the job it stopped waiting for
    say_meanwhile(f"{operation.name} may still be running: cancelling it was cut short; explaind operations cancel {operation.name} stops it")
    try:
        if not operation.done:  # one ended already (a --request-id's earlier run's) says so
            # Not where another run under the id (a retry in a second terminal) made it or was answered with it, up to
            # the cancel itself (the server decides): its wait would end. An older server cancels.
            operation._cancel_unless_asked_by_another_run()
    except (ExplaindError, KeyboardInterrupt) as error:
        why = "interrupted again" if isinstance(error, KeyboardInterrupt) else error
        interrupt.add_note(f"{operation.name} may still be running: cancelling it failed ({why}); explaind operations cancel {operation.name} stops it")
        return
    if operation._left_for_another_run:
        interrupt.add_note(f"{operation.name} goes on: another run asked for it under request_id {request_id} too, whose wait cancelling "
                           f"it would end; explaind operations cancel {operation.name} stops it")
        return
    if started_by_repeat and _ended_cancelled(operation, say_meanwhile) and _deleted(operation):
        # Nobody asked for it: a CANCELLED job listed would read as one this command had started.
        del interrupt.operation  # type: ignore[attr-defined]
        # None was kept under the id: the start had not reached the server, or a restart ended the job it started (FAILED, ABORTED:
        # the server runs such a request again), which nothing here tells apart.
        # A run again under a --request-id given is refused; one choosing its own (the report has no such option) is not.
        rerun = "; running it again takes a new --request-id, as the server refuses a deleted job's" if given else ""
        interrupt.add_note(f"no job runs under request_id {request_id}: the one sending it again started, to find it, was cancelled and "
                           "deleted (the start had not reached the server, or a restart ended its job, failed ABORTED: explaind operations "
                           f"list shows it){rerun}")
        return
    interrupt.add_note(cancel_outcome(operation))


def _ended_cancelled(operation: Operation[Any], say_meanwhile: Callable[[str | None], None]) -> bool:
    """Whether ``operation``, its cancel asked for, has ended CANCELLED: one running (an idle
    worker starts the job the repeat made before the cancel reaches it) is waited for up to
    :data:`REPEATED_JOB_END_WAIT_S` (a second Ctrl-C, or an error, stops waiting)."""
    say_meanwhile(cancel_outcome(operation))
    if not operation.done and operation.cancel_requested:
        try:
            operation.wait(REPEATED_JOB_END_WAIT_S)
        except (ExplaindError, KeyboardInterrupt):
            return False
        say_meanwhile(cancel_outcome(operation))
    return operation.state == "cancelled"


def _deleted(operation: Operation[Any]) -> bool:
    """Whether ``operation``, cancelled, was deleted; where not (a second Ctrl-C, the server
    gone), it stays listed as cancelled, which the interrupt's notes then say."""
    try:
        operation.delete()
    except (ExplaindError, KeyboardInterrupt):
        return False
    return True


def followed_ranking(client: Client, sample_set_id: str, target_class: str | int, request_id: str | None = None, *, started_by: str,
                     progress: bool, announce: Callable[[Operation[NeuronRanking]], None] | None = None, **options: Any) -> NeuronRanking:
    """``client.rank_mistake_neurons(sample_set_id, target_class, **options)``'s ranking, its
    start followed to its job should a Ctrl-C land inside it (:func:`started_job`, its notes
    sending to the list: no --no-wait makes a ranking's job name itself), and a job's wait
    showing ``progress`` (a Ctrl-C there cancels the job and names it). The start sent
    again is bounded by :data:`RANKING_REPEAT_TIMEOUT_S`. ``announce`` gets the job, where
    the set is ranked as one, before its wait (the CLI's rank says whose job it is)."""
    rank = functools.partial(client._start_ranking, sample_set_id, target_class, **options)
    started = started_job(client, lambda request_id: rank(request_id=request_id), request_id, started_by=started_by, rerun_hint=False,
                          repeat=lambda request_id: rank(request_id=request_id, timeout=min(client.timeout, RANKING_REPEAT_TIMEOUT_S)))
    if isinstance(started, NeuronRanking):  # answered inline
        return started
    if announce is not None:
        announce(started)
    return dataclasses.replace(started.result(progress=progress), operation=started.name, requested_again=started.requested_again)
