"""momrec's tests. A package, so that tests/conftest.py and tests/testutil.py are imported as ``tests.*`` and the
folder itself is not put on sys.path, where tests/shards, tests/pretrain and tests/finetune would shadow the
packages of the same names."""
