#!/usr/bin/perl
# A snakepit worker written from docs/protocol.md and docs/conformance.md alone.
#
# Speaks protocol v1 over stdio (length-prefixed JSON frames), runs one call at a time
# (max_in_flight 1), and offers the conformance tools of docs/conformance.md. It does not
# negotiate binary segments, shared memory, pipelining or busy pings.
#
# Run as: perl tests/workers/protocol_only.pl   (core modules only)
use strict;
use warnings;
use Fcntl qw(F_GETFD F_SETFD FD_CLOEXEC);
use IO::Handle;
use JSON::PP;
use POSIX ();
use Time::HiRes qw(time);

# --- stdout safety (§1): move the protocol off fds 0 and 1 before anything else -------------
open(my $IN,  '<&', \*STDIN)  or die "dup stdin: $!";
open(my $OUT, '>&', \*STDOUT) or die "dup stdout: $!";
for my $fh ($IN, $OUT) {
    binmode $fh;
    my $flags = fcntl($fh, F_GETFD, 0) or die "fcntl: $!";
    fcntl($fh, F_SETFD, $flags | FD_CLOEXEC) or die "fcntl: $!";
}
POSIX::dup2(fileno(STDERR), 1) or die "dup2 stderr->stdout: $!";  # print() now goes to stderr
open(STDIN, '<', '/dev/null') or die "reopen stdin: $!";
binmode $_ for \*STDIN, \*STDOUT, \*STDERR;
STDOUT->autoflush(1);
STDERR->autoflush(1);
$SIG{PIPE} = 'IGNORE';    # a vanished host shows up as a write error instead

my $BRIDGE = sprintf('perl/%vd protocol_only.pl', $^V);
# allow_bignum keeps floats (and integers beyond 64 bits) exact through echo: they decode as
# Math::BigFloat/BigInt and are written back as their decimal text.
my $JSON = JSON::PP->new->utf8->allow_nonref->allow_bignum;

sub logmsg { print STDERR "protocol_only.pl: @_\n" }

# --- state -----------------------------------------------------------------------------------
my $max_frame = 64 * 1024 * 1024;   # from hello
my $inbuf     = '';                 # bytes read from the host, not yet parsed
my $eof       = 0;                  # the host closed our input
my @queued;                         # `call` frames that arrived while another call ran
my $shutdown  = 0;                  # `shutdown` seen: exit once the running call is answered
my ($cur_id, $cancelled, $credit);  # the running call: id, cancel requested, stream credit
my %host_results;                   # host_call id => host_result frame (while awaited)
my $host_call_id = 0;
my @journal;
my $sig_cancel = 0;                 # set by the cancel signal
$SIG{USR1} = sub { $sig_cancel = 1 };

# --- framing (§1) ----------------------------------------------------------------------------
# Writes one frame. For an answer ($answer true) a body over max_frame is not written: it dies
# with FrameTooLarge instead (§1), and a value JSON cannot encode dies with TypeError (§4).
sub send_frame {
    my ($msg, $answer) = @_;
    my $body = eval { $JSON->encode($msg) } // fail_with('TypeError', "cannot encode: $@");
    fail_with('FrameTooLarge', sprintf('%s of %d bytes is over max_frame %d',
              $msg->{t}, length $body, $max_frame)) if $answer && length $body > $max_frame;
    my $buf  = pack('N', length $body) . $body;
    while (length $buf) {
        my $n = syswrite($OUT, $buf);
        if (!defined $n) { next if $!{EINTR}; logmsg("write: $!"); POSIX::_exit(1) }
        substr($buf, 0, $n, '');
    }
}

sub bad_frame { logmsg("bad frame from host: @_"); exit 2 }

# One complete frame from $inbuf, or undef.
sub take_frame {
    return undef if length($inbuf) < 4;
    my $len = unpack('N', $inbuf);
    bad_frame('segmented frame, segments were not agreed') if $len & 0x8000_0000;
    bad_frame("header of $len bytes is over max_frame $max_frame") if $len > $max_frame;
    return undef if length($inbuf) < 4 + $len;
    my $body = substr($inbuf, 4, $len);
    substr($inbuf, 0, 4 + $len, '');
    my $msg = eval { $JSON->decode($body) };
    bad_frame("not JSON: $@") if $@;
    bad_frame('not an object with a string `t`')
        unless ref $msg eq 'HASH' && defined $msg->{t} && !ref $msg->{t};
    return $msg;
}

# The next frame, waiting at most $timeout seconds (undef: until one comes). Returns undef on
# timeout, at end of input, or when a signal interrupted the wait (callers re-check state).
sub next_frame {
    my ($timeout) = @_;
    my $deadline = defined $timeout ? time + $timeout : undef;
    while (1) {
        my $f = take_frame();
        return $f if $f;
        if ($eof) { bad_frame('input ended inside a frame') if length $inbuf; return undef }
        my $wait = defined $deadline ? $deadline - time : undef;
        $wait = 0 if defined $wait && $wait < 0;
        my $rin = '';
        vec($rin, fileno($IN), 1) = 1;
        my $n = select(my $rout = $rin, undef, undef, $wait);
        if ($n < 0) { return undef if $!{EINTR}; die "select: $!" }
        return undef if $n == 0;
        my $r = sysread($IN, $inbuf, 1 << 20, length $inbuf);
        if (!defined $r) { return undef if $!{EINTR}; die "read: $!" }
        $eof = 1 if $r == 0;
    }
}

sub for_running_call { defined $cur_id && defined $_[0]{id} && $_[0]{id} == $cur_id }

# Handles a frame that is not a new call to run now; may arrive idle or while a call runs.
sub handle_frame {
    my ($f) = @_;
    my $t = $f->{t};
    if    ($t eq 'ping')     { send_frame({ t => 'pong', id => $f->{id} }) }
    elsif ($t eq 'shutdown') { $shutdown = 1 }
    elsif ($t eq 'call')     { push @queued, $f }    # only with pipelining, which we refuse
    elsif ($t eq 'cancel')   { $cancelled = 1 if for_running_call($f) }   # else: already answered
    elsif ($t eq 'credit')   { $credit += num($f->{n}) if for_running_call($f) }
    elsif ($t eq 'host_result') {
        $host_results{ $f->{id} } = $f if exists $host_results{ $f->{id} };
    }
    elsif ($t eq 'release') { }                      # shared memory: never agreed
    else  { logmsg("ignoring message of type $t") }
}

# --- helpers for tools -----------------------------------------------------------------------
sub fail_with { die { type => $_[0], message => $_[1] } }
sub num {    # a plain Perl number from a decoded JSON number (maybe a Math::BigFloat)
    my ($v) = @_;
    return ref $v && $v->can('numify') ? $v->numify : ref $v ? 0 : ($v // 0);
}

# Reads what the host already sent and dies with Cancelled if the running call was cancelled
# (by a `cancel` frame or by the cancel signal).
sub check_cancel {
    while (my $f = next_frame(0)) { handle_frame($f) }
    fail_with('Cancelled', 'the call was cancelled') if $cancelled || $sig_cancel;
}

# Waits for frames until $done->() holds, honouring cancel; at end of input: Cancelled.
sub wait_for {
    my ($done) = @_;
    while (1) {
        check_cancel();    # this may read what we wait for, so test $done after it
        return if $done->();
        fail_with('Cancelled', 'input closed while waiting for the host') if $eof;
        my $f = next_frame(undef);
        handle_frame($f) if $f;
    }
}

# Sleeps $secs seconds; unless $stubborn, a cancel cuts it short.
sub nap {
    my ($secs, $stubborn) = @_;
    my $deadline = time + $secs;
    while ((my $left = $deadline - time) > 0) {
        check_cancel() unless $stubborn;
        if ($stubborn || $eof) { Time::HiRes::sleep($left); next }   # a signal only wakes it
        my $f = next_frame($left);
        handle_frame($f) if $f;
    }
    check_cancel() unless $stubborn;
}

# A call to the host (§4b): returns its host_result frame.
sub host_call {
    my ($call_id, $name, $args) = @_;
    my $id = ++$host_call_id;
    $host_results{$id} = undef;
    send_frame({ t => 'host_call', id => $id, call => $call_id, name => $name, args => $args });
    my $r = eval { wait_for(sub { defined $host_results{$id} }); $host_results{$id} };
    my $err = $@;
    delete $host_results{$id};    # a late host_result for it is then dropped
    die $err unless $r;
    return $r;
}

# host_call that dies with the host's error, as a tool error.
sub host_value {
    my $r = host_call(@_);
    fail_with($r->{error}{type} // 'HostError', $r->{error}{message} // '') if $r->{error};
    return $r->{ok};
}

sub touch_file {
    my ($path) = @_;
    open(my $fh, '>>', $path) or fail_with('OSError', "cannot create $path: $!");
    close $fh;
}

# --- the conformance tools (docs/conformance.md) ---------------------------------------------
# Each: doc, run => sub ($args, $call, $emit). Generator tools (stream => 1) pass each item to
# $emit and return nothing; plain tools return their result.
my %TOOLS = (
    ping  => { doc => 'Returns "pong".', run => sub { 'pong' } },
    echo  => { doc => 'Returns its args unchanged.', run => sub { $_[0] } },
    add   => { doc => 'Returns a + b.', run => sub { $_[0]{a} + $_[0]{b} } },
    fail  => { doc => 'Fails with the given type and message.',
               run => sub { fail_with($_[0]{type} // 'ValueError', $_[0]{message} // 'boom') } },
    crash => { doc => 'Exits at once with status code, answering nothing.',
               run => sub { POSIX::_exit(num($_[0]{code} // 1)) } },
    pid   => { doc => 'Returns the pid of the process that speaks the protocol.', run => sub { $$ } },
    sleep => { doc => 'Waits ms milliseconds (a cancel cuts it short); returns ms.',
               run => sub { nap(num($_[0]{ms}) / 1000, 0); $_[0]{ms} } },
    stubborn_sleep => { doc => 'Waits ms milliseconds, ignoring any cancel; returns ms.',
               run => sub { nap(num($_[0]{ms}) / 1000, 1); $_[0]{ms} } },
    spin  => { doc => 'Computes for seconds, stopping early when cancelled; returns iterations.',
               run => \&spin },
    count => { doc => 'Streams {"i": 0} .. {"i": n-1} (endless without n); touches path at the end.',
               stream => 1, run => \&count },
    fail_after => { doc => 'Streams 0 .. n-1, then fails with ValueError.', stream => 1,
               run => \&fail_after },
    ask_host => { doc => 'Calls host tool name with args; returns {"ok": r} or {"error", "message"}.',
               run => sub {
                   my $r = host_call($_[1]{id}, $_[0]{name}, $_[0]{args});
                   $r->{error} ? { error => $r->{error}{type}, message => $r->{error}{message} }
                               : { ok => $r->{ok} };
               } },
    remember => { doc => 'session.set then session.get of name; returns what get gave.',
               run => sub {
                   my ($args, $call) = @_;
                   host_value($call->{id}, 'session.set', { name => $args->{name}, value => $args->{value} });
                   host_value($call->{id}, 'session.get', { name => $args->{name} });
               } },
    recall => { doc => 'session.get of name (null when missing or outside a session).',
               run => sub {
                   my $r = host_call($_[1]{id}, 'session.get', { name => $_[0]{name} });
                   $r->{error} ? undef : $r->{ok};
               } },
    print_stdout => { doc => 'Prints text and a newline to stdout; returns its length.',
               run => sub {
                   my $text = $_[0]{text} // '';
                   my $bytes = $text;
                   utf8::encode($bytes);
                   print STDOUT $bytes, "\n";
                   length $text;
               } },
    grandchild => { doc => 'Starts a child that ignores TERM and HUP and lives forever; returns its pid.',
               run => \&grandchild },
    touch => { doc => 'Creates the file path; returns path.',
               run => sub { touch_file($_[0]{path}); $_[0]{path} } },
    journal => { doc => 'Appends entry (unless null) to a kept list; returns the list.',
               run => sub {
                   push @journal, $_[0]{entry} if ref $_[0] eq 'HASH' && defined $_[0]{entry};
                   [@journal];
               } },
    big   => { doc => 'Returns a string of `bytes` characters.', run => sub { 'x' x num($_[0]{bytes}) } },
);

sub spin {
    my ($args) = @_;
    my $deadline = time + num($args->{seconds});
    my ($iterations, $x) = (0, 0);
    while (time < $deadline) {
        $x = ($x * 31 + $_) % 1_000_003 for 1 .. 2000;   # one slice of work (well under 1 ms)
        $iterations++;
        check_cancel();
    }
    return $iterations;
}

sub count {
    my ($args, $call, $emit) = @_;
    my $n = defined $args->{n} ? num($args->{n}) : undef;   # no n: endless
    my $ok = eval { for (my $i = 0; !defined $n || $i < $n; $i++) { $emit->({ i => $i }) } 1 };
    my $err = $@;
    touch_file($args->{path}) if defined $args->{path};   # on end and on cancel alike
    die $err unless $ok;
    return;
}

sub fail_after {
    my ($args, $call, $emit) = @_;
    my $n = num($args->{n});
    $emit->($_) for 0 .. $n - 1;
    fail_with('ValueError', "failed after $n items");
}

sub grandchild {
    my ($args) = @_;
    my $pid = fork // fail_with('OSError', "fork: $!");
    return $pid if $pid;
    # The child: leave the protocol pipes and the host's stderr alone, then live forever.
    @SIG{qw(TERM HUP)} = ('IGNORE', 'IGNORE');
    $SIG{USR1} = 'DEFAULT';
    POSIX::setsid() if $args->{setsid};
    close $IN;
    close $OUT;
    open(STDIN,  '<', '/dev/null');
    open(STDOUT, '>', '/dev/null');
    open(STDERR, '>', '/dev/null');
    sleep 3600 while 1;
}

# --- running one call (§4, §4a) --------------------------------------------------------------
sub answer_error {
    my ($id, $err) = @_;
    my ($type, $msg) = ref $err eq 'HASH' ? ($err->{type}, $err->{message} // '') : ('PerlError', "$err");
    $msg =~ s/\s+\z//;    # die's trailing newline
    send_frame({ t => 'error', id => $id, error => { type => $type, message => $msg } });
}

sub run_call {
    my ($call) = @_;
    my $id = $cur_id = $call->{id};
    ($cancelled, $sig_cancel, $credit) = (0, 0, $call->{stream} // 0);
    my $streaming = $credit > 0;
    my $tool = $TOOLS{ $call->{cmd} // '' };
    my $args = $call->{args};
    my @items;    # a generator's items when it was not called as a stream
    my $emit = sub {
        my ($item) = @_;
        return push @items, $item unless $streaming;
        wait_for(sub { $credit > 0 });        # never more chunks than credit
        send_frame({ t => 'chunk', id => $id, data => $item }, 1);
        $credit--;
        check_cancel();
    };
    my $ok = eval {
        fail_with('UnknownCommand', "unknown command: " . ($call->{cmd} // 'null')) unless $tool;
        my $r = $tool->{run}->($args, $call, $emit);
        $r = \@items if $tool->{stream};
        if (!$streaming)        { send_frame({ t => 'result', id => $id, ok => $r }, 1) }
        elsif (!$tool->{stream}) { $emit->($r) }   # a plain tool called as a stream: one chunk
        send_frame({ t => 'end', id => $id }) if $streaming;
        1;
    };
    answer_error($id, $@) unless $ok;
    $cur_id = undef;
}

# --- handshake (§3) --------------------------------------------------------------------------
my $hello = next_frame(undef) // do { logmsg('input ended before hello'); exit 0 };
bad_frame("expected hello, got $hello->{t}") unless $hello->{t} eq 'hello';
my @offered = @{ ref $hello->{versions} eq 'ARRAY' ? $hello->{versions} : [] };
unless (grep { $_ == 1 } @offered) {
    send_frame({ t => 'refuse', versions => [1], bridge => $BRIDGE,
                 reason => "$BRIDGE speaks protocol versions [1], the host offered [@offered]" });
    exit 0;
}
$max_frame = num($hello->{max_frame}) if defined $hello->{max_frame};
# An offered shared-memory arena is inherited at fd; we do not map it, so close it.
my $shm = $hello->{shm};
if (ref $shm eq 'HASH' && defined $shm->{fd}) {
    my $fd = num($shm->{fd});
    POSIX::close($fd) if $fd > 2 && $fd != fileno($IN) && $fd != fileno($OUT);
}

send_frame({
    t => 'ready', version => 1, pid => $$, max_in_flight => 1, bridge => $BRIDGE,
    cancel_signal => POSIX::SIGUSR1(),
    tools => [ map { { name => $_, doc => $TOOLS{$_}{doc},
                       ($TOOLS{$_}{stream} ? (stream => JSON::PP::true) : ()) } } sort keys %TOOLS ],
});

# --- main loop -------------------------------------------------------------------------------
until ($shutdown) {
    my $f = shift(@queued) // next_frame(undef);
    if (!$f) { last if $eof; next }      # undef without eof: a signal woke us up
    if ($f->{t} eq 'call') { run_call($f) } else { handle_frame($f) }
}
exit 0;
