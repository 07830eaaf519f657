#!/usr/bin/perl
# lsyncd's "rsync.binary" on a meshsync node: the gate (docs/DESIGN.md, "Data plane").
#
# lsyncd runs this once per batch and peer with an rsync command line and the batch's
# include patterns on stdin. It hands both to the agent over the unix socket
# $MESH_GATE_SOCKET and exits with the status the agent answers. The agent decides which
# of the paths may go to the peer (the resolver's gate), pushes those with rsync through
# its TLS tunnel and counts the push; this script runs nothing itself.
#
# Perl, not Python: it starts on every lsyncd batch, also for every batch of files a peer
# pushed in (which the agent refuses at once), and perl-base is on every Debian system.
# Starting it costs a few milliseconds; a Python interpreter costs tens.
#
# Protocol (version 2), one request and one reply per connection:
#   request  "mesh-gate 2\n", then two fields, each a 4-byte big-endian length and
#            bytes: the command line (arguments joined by NUL), the include patterns
#   reply    "<exit status>\n", then optionally one line for lsyncd's log
# Exit 10 (rsync's "socket I/O error", which lsyncd retries) when the agent cannot be
# asked or goes away before it answers.

# No modules, not even strict, warnings or Socket: they cost more than the rest of the
# script (1.7 ms per run without them, 6.8 ms with Socket alone, measured on the dev
# machine). Linux's values: AF_UNIX 1, SOCK_STREAM 1, SHUT_WR 1; a sockaddr_un is the
# family (native unsigned short) and the path, NUL-padded to 108 bytes.
my $AF_UNIX = 1;
my $SOCK_STREAM = 1;
my $SHUT_WR = 1;
my $RETRY = 10;

sub give_up {
    print STDERR "mesh gate: @_\n";
    exit $RETRY;
}

my $path = $ENV{MESH_GATE_SOCKET} or give_up("MESH_GATE_SOCKET is not set");
binmode STDIN;
my $patterns = do { local $/; <STDIN> } // '';
my $request = "mesh-gate 2\n" . pack("N/a* N/a*", join("\0", @ARGV), $patterns);

give_up("MESH_GATE_SOCKET is longer than a unix socket path") if length($path) > 107;
socket(my $agent, $AF_UNIX, $SOCK_STREAM, 0) or give_up("socket: $!");
connect($agent, pack("S Z108", $AF_UNIX, $path)) or give_up("agent at $path: $!");
binmode $agent;
my $sent = 0;
while ($sent < length $request) {
    my $n = syswrite($agent, $request, length($request) - $sent, $sent);
    give_up("agent at $path: $!") unless defined $n;
    $sent += $n;
}
shutdown($agent, $SHUT_WR);

my $status = <$agent>;
give_up("agent at $path closed without an answer") unless defined $status;
my $note = <$agent>;
print STDERR "mesh gate: $note" if defined $note && $note ne '';
give_up("agent at $path answered '$status'") unless $status =~ /\A(\d{1,3})\n\z/;
exit $1;
