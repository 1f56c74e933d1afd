"""What the notebooks need besides the method: kept apart from it, each written once.

* ``data``, ``models``, ``training``: vision data sets that ship offline, small models, a trainer;
* ``vision``: notebook 02's settings, target models, ground truth and Daunce helpers;
* ``groundtruth``: LDS ground truth (retrains on half subsets, resumable);
* ``baselines``: dattri / kronfluence attribution baselines, each in an isolated process;
* ``tuning``: one tuning rule for every method, grids extended until they contain their best value;
* ``copyruns``: sets of Daunce copies for a benchmark, trained side by side on every core and kept on disk;
* ``textdata``: math and instruction-following sets; ``removal``: notebook 03's removal test (theta0 per seed,
  converged-copy settings, controls, retrains); ``backdoor``: the poisoned set of notebook 04, its targets and
  one seed's pipeline;
* ``paths``: where outputs go.
"""
