"""cluster.runtime.startup_gc: the collector is off inside, on again after (also after an exception), what
start-up built is frozen, nested uses change nothing, and interpreter exit unfreezes."""

import atexit
import gc
import subprocess
import sys

import pytest

from cluster.runtime import startup_gc


@pytest.fixture
def restore_gc():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    atexit.unregister(gc.unfreeze)
    (gc.enable if was else gc.disable)()


def test_off_inside_on_after_and_frozen(restore_gc):
    gc.enable()
    gc.unfreeze()
    with startup_gc():
        assert not gc.isenabled()
        built = [[i] for i in range(1000)]
        with startup_gc():            # nested: still off, and leaving it does not turn the collector on
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() >= len(built)
    assert not any(gc.is_tracked(x) and x in gc.get_objects(generation=0) for x in built[:3])


def test_an_exception_inside_still_turns_it_back_on(restore_gc):
    gc.enable()
    with pytest.raises(RuntimeError):
        with startup_gc():
            raise RuntimeError("start-up failed")
    assert gc.isenabled()


def test_disabled_by_someone_else_stays_disabled(restore_gc):
    gc.disable()
    with startup_gc():
        pass
    assert not gc.isenabled()


def test_exit_unfreezes_so_finalizers_of_frozen_cycles_run():
    code = ("import gc\nfrom cluster.runtime import startup_gc\n"
            "class C:\n    def __del__(self):\n        print('finalized', flush=True)\n"
            "with startup_gc():\n    c = C(); c.me = c; del c\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "finalized"
