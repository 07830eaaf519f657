#!/usr/bin/perl
# The receiving daemon's "pre-xfer exec" hook: the check that lets a push write only into
# its own staging dir, <keep>/in/<push id>/, with the live tree as its delta basis (see
# mesh/adapters/rsync/rsyncd.py for why and how). rsync runs it once per push, before any
# file is touched; exit 0 lets the transfer start, anything else aborts it, and rsync
# shows what this prints to the client.
#
# Accepted, from RSYNC_ARG0..n: rsyncd --server -<bundle> [--numeric-ids]
# --copy-dest ../../../ . /<keep>/in/<push id>/ (also without the first "/", and
# --copy-dest=../../../), in any option order, where the bundle holds letters of rlptgoI
# and rsync's "e.<capabilities>" suffix.
#
# Perl with no modules: it starts on every push (about 2 ms; Python took 20).

my $push = $ENV{MESH_PUSH_ID} // '';
my $keep = $ENV{MESH_KEEP_NAME} // '';

sub refuse {
    print "meshsync refused push $push: $_[0]\n";
    exit 1;
}

refuse("the tunnel did not name this push")
    unless $push =~ /\A[A-Za-z0-9][A-Za-z0-9_-]{0,127}\z/
    && $keep =~ /\A\.[A-Za-z0-9][A-Za-z0-9_-]{0,62}\z/;
my $module = $ENV{RSYNC_MODULE_NAME} // '';
refuse("unknown module '$module'") unless $module eq 'data';

my @args;
push @args, $ENV{"RSYNC_ARG" . scalar @args} while exists $ENV{"RSYNC_ARG" . scalar @args};
refuse("not an rsync server request")
    unless @args >= 2 && $args[0] eq 'rsyncd' && $args[1] eq '--server';
my ($end) = grep { $args[$_] eq '.' } 0 .. $#args;
refuse("no end of options") unless defined $end;

# With "use chroot = yes" rsync hands the destination from the module root
# ("/<keep>/in/<push id>/"), without a chroot relative to it; both name the same dir.
my $expected = "/$keep/in/$push/";
my @dest = @args[$end + 1 .. $#args];
refuse("destination must be $expected")
    unless @dest == 1 && ($dest[0] eq $expected || $dest[0] eq substr($expected, 1));

my (@bundles, @copy_dests);
my @options = @args[2 .. $end - 1];
while (@options) {
    my $arg = shift @options;
    if ($arg eq '--copy-dest' && @options) {
        push @copy_dests, shift @options;
    } elsif ($arg =~ /\A--copy-dest=(.*)\z/s) {
        push @copy_dests, $1;
    } elsif ($arg eq '--numeric-ids') {
        next;
    } elsif ($arg =~ /\A-([^-].*)\z/s) {
        push @bundles, $1;
    } else {
        refuse("option '" . substr($arg, 0, 60) . "' is not allowed");
    }
}
refuse("exactly one --copy-dest=../../../ is required")
    unless @copy_dests == 1 && $copy_dests[0] eq '../../../';
refuse("expected exactly one short-option bundle") unless @bundles == 1;
my ($letters, $capabilities) = $bundles[0] =~ /\A([^e]*)(?:e(.*))?\z/s;
my %seen;
my $unknown = join '', sort grep { index('rlptgoI', $_) < 0 && !$seen{$_}++ } split //, $letters;
refuse("short option(s) '$unknown' not allowed") if $unknown ne '';
refuse("malformed capability flags")
    if defined $capabilities && $capabilities !~ /\A[.A-Za-z0-9]*\z/;
exit 0;
