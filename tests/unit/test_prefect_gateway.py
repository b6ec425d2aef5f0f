"""flows.gateways.prefect_api.end_run: the one place tunedeck forces a flow run's state."""

from __future__ import annotations

from types import SimpleNamespace

from prefect.states import Cancelling, Completed, Crashed, Running

from flows.gateways.prefect_api import end_run


class Client:
    """Records what end_run asks of a sync PrefectClient (only the two calls it makes)."""

    def __init__(self, state):
        self.state, self.set = state, []

    def read_flow_run(self, run_id):
        return SimpleNamespace(id=run_id, state=self.state)

    def set_flow_run_state(self, run_id, state, force=False):
        self.set.append((run_id, state.type.value, force))


def test_an_open_run_is_ended_and_a_final_one_keeps_its_state_unless_told_otherwise():
    running, done, unknown = Client(Running()), Client(Completed()), Client(None)
    assert end_run("a", Crashed(message="gone"), client=running) and running.set == [("a", "CRASHED", True)]
    assert end_run("b", Crashed(), client=unknown) and unknown.set == [("b", "CRASHED", True)]
    assert not end_run("c", Crashed(), client=done) and done.set == [], "its engine got there first"
    assert end_run("c", Cancelling(), if_open=False, client=done) and done.set == [("c", "CANCELLING", True)]


def test_a_deployment_the_server_lacks_is_one_sentence():
    """`tunedeck plan --run` (and the demo) start runs of a deployment: on a server nobody deployed to, say so."""
    import pytest
    from prefect.exceptions import ObjectNotFound

    from flows.core.errors import TunedeckError
    from flows.gateways.prefect_api import start_deployment_run

    class Undeployed:
        def read_deployment_by_name(self, name):
            raise ObjectNotFound(http_exc=None)

    with pytest.raises(TunedeckError, match=r"no deployment pipeline/pipeline: run `tunedeck deploy`"):
        start_deployment_run("pipeline/pipeline", {}, client=Undeployed())
