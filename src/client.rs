//! HTTP client for `cyrnelctl`: placeholder until the CLI lands.
