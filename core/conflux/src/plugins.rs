//! Links every plugin crate into the binary so their registrations are kept.
//! This is the only list of plugin crates; types register themselves.

pub fn link_all() {
    conflux_std::link();
    conflux_rhai::link();
    conflux_aggregate::link();
    conflux_wasm::link();
    conflux_http::link();
    conflux_validate::link();
    conflux_nats::link();
    conflux_kafka::link();
    conflux_redis::link();
    conflux_postgres::link();
    conflux_broadcast::link();
}
