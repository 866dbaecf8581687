"""Runners other than the default local process pool (:mod:`mvprep.pool`).

* :mod:`mvprep.runners.ray_runner`: units as plain Ray tasks (optional extra ``mvkit[ray]``,
  imported only when ``--runner ray`` is used);
* :mod:`mvprep.runners.journal`: the attempt journal that lets a retried Ray task know
  which record killed the worker before it.

Every runner runs the same work unit (:func:`mvprep.unit.run_unit`), so the shards do not
depend on the runner. ``--part i/n`` (:mod:`mvprep.partition`) is not a runner: it picks
units, and any runner can run them.
"""
