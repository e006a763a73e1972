"""Benchmarks on real music (kept outside the package and the test suite).

Importing the package pins the environment every benchmark measures under, before numpy or librosa load:
one BLAS/OpenMP thread (honest one-thread CPU times, here, in spawned workers and in CLI runs) and one numba
cache shared by all processes.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

from genre_batch import default_numba_cache_dir  # light: the package's __init__ loads no numpy

os.environ.setdefault("NUMBA_CACHE_DIR", default_numba_cache_dir())
