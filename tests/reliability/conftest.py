"""Fixtures of the reliability tests, borrowed from the test modules that own them (see reliability_support)."""

from reliability_support import pretrain_fixtures

folders = pretrain_fixtures.folders
