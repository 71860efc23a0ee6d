"""Helpers shared by test files of the groups (a test file never imports
another test file). On sys.path through pytest's `pythonpath = ["tests"]`.
Lab pieces that scripts use too live in netns_lab.harness instead."""
