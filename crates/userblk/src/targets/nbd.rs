//! `nbd`: a remote NBD server as a target.
