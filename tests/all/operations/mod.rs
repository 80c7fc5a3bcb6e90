//! Operating the host: probes through shutdown, metrics of a running fleet, the admin API and
//! its authentication, the status page in a real browser, and the deployment files.

mod admin_api;
mod deploy_files;
mod failures_visible;
mod metrics_scrape;
mod probes;
mod status_page;
