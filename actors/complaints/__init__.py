"""Complaints: the pure decider (commands, events, state, rules) and its domain errors.

``actors.complaints.domain`` holds the decider; the handler, projections, queries and API that
run it on the runtime live beside it.
"""
