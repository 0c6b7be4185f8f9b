from backend.metrics import Metrics

FORBIDDEN_LABELS = {"user", "user_id", "session", "session_id", "thread", "thread_id"}


def test_metrics_are_namespaced() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    assert names and all(name.startswith("qwen_") for name in names)


def test_no_user_or_session_labels() -> None:
    metrics = Metrics()
    metrics.requests.labels("ok").inc()
    metrics.engine_up.labels("http://engine:8000/v1").set(1)
    labels = {key for m in metrics.registry.collect() for s in m.samples for key in s.labels}
    assert not labels & FORBIDDEN_LABELS


def test_render_is_prometheus_text() -> None:
    metrics = Metrics()
    metrics.requests.labels("ok").inc()
    assert b'qwen_requests_total{outcome="ok"} 1.0' in metrics.render()


def test_registries_are_independent() -> None:
    first, second = Metrics(), Metrics()
    first.requests.labels("ok").inc()
    assert second.registry.get_sample_value("qwen_requests_total", {"outcome": "ok"}) is None


def test_engine_series_of_a_replica_that_left_are_removed() -> None:
    metrics = Metrics()
    a, b = "http://10.0.0.1:8080/v1", "http://10.0.0.2:8080/v1"
    metrics.set_engines(up={a: True, b: False}, breaker_open={a: False, b: True})
    assert metrics.registry.get_sample_value("qwen_engine_up", {"replica": b}) == 0
    metrics.set_engines(up={a: True}, breaker_open={a: False})
    for name in ("qwen_engine_up", "qwen_engine_breaker_open"):
        assert metrics.registry.get_sample_value(name, {"replica": b}) is None
        assert metrics.registry.get_sample_value(name, {"replica": a}) is not None
