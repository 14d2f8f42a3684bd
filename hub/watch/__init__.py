"""The watch loop's domain: atoms, their observations, scores, weights and decisions.

Each module is one part of the loop and its protocol methods: ``observations`` (atoms and
their readings), ``scoring`` (work for scorers, recorded scores, history), ``weights``
(versions and activation), ``decisions`` (the nerve's choices, alerts, feedback),
``schedules`` (periodic tasks), ``series`` and ``views`` (the read-only pictures the
dashboard, the API and ``kiri status`` draw).
"""
