//! The end-to-end tests: real `gantry` and `gantry-worker` processes, real servers (etcd,
//! Chromium, the Python clients) and the real models, one module per area, in one test binary.

#![allow(clippy::unwrap_used)]

mod common;

mod auth_keys;
mod autoscale;
mod cli_errors;
mod cli_generate;
mod cli_real_models;
mod cli_up;
mod controller_api;
mod controller_e2e;
mod controller_python;
mod controller_sharding;
mod dashboard_chromium;
mod faults_netns;
mod helm_args;
mod hostile_input;
mod load;
mod logs_json;
mod measured;
mod metrics_promtool;
mod openai_python;
mod reflection_python;
mod reliability;
mod routing;
mod tls_mutual;
mod url_source;
mod worker_binary;
mod worker_grpc;
mod worker_hub;
mod worker_link;
mod worker_pipeline;
mod worker_python;
