//! NBD client: connect to a server, negotiate, send requests, match replies.
