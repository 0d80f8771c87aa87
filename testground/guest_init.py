"""What the test guest does and says: its /init, the DHCP hook it runs, and the console lines they print.

testground.guest builds these into the guest's initramfs. The guest's story is told on its serial console
(ttyS0, the init's stdout), one line per fact, each beginning with one of the markers below, so tests read
real effects inside a real guest: disks, config drive, network, hot-plugged volumes, migration, and since
issue 21 the guest's own traffic (a DHCP lease, a web server, a probe of another address).
"""

from __future__ import annotations

BOOT_MARKER = "KUBENOVA-GUEST-BOOTED"
RESCUE_MARKER = "KUBENOVA-RESCUE-BOOTED"
TICK = "kubenova-guest-tick"
DISK = "kubenova-disk"
CD_FILE = "kubenova-cd-file"
NET = "kubenova-net"
#: "kubenova-mac eth0 <address>": the MAC the guest's eth0 has, before tick 0 and every tenth tick after it,
#: so a guest that moved (live migration: no new boot) still says which address it sees.
MAC = "kubenova-mac"
MAC_EVERY = 10
WROTE = "kubenova-wrote"
#: "kubenova-filled <dev> <MiB>": the fill hook (kubenova.fill=<dev>) has written that many MiB of <dev>.
FILLED = "kubenova-filled"
#: "kubenova-timed <dev> <MiB> <start> <end>": the timed-write hook (kubenova.timed=<dev>[,<dev>...]:<MiB>)
#: wrote that many MiB of zeros to <dev> with O_DIRECT, between those seconds of the guest's uptime.
TIMED = "kubenova-timed"
#: "kubenova-spoofing eth0 <address>": the guest (kubenova.spoof=<address>) now sends with a MAC that is not
#: its own, as a hostile guest would; "kubenova-spoofed eth0" once it has sent for a while.
SPOOFING = "kubenova-spoofing"
SPOOFED = "kubenova-spoofed"
#: kubenova.shell=console: an interactive shell on the serial console (the console tests type into it).
SHELL_ARG = "kubenova.shell=console"
#: "kubenova-size cpus=N memtotal-kib=M": what the guest's kernel sees (a resize shows here).
SIZE = "kubenova-size"
#: "kubenova-dirty <MiB>": the guest (kubenova.dirty=<MiB>) has filled that much memory and now rewrites it
#: without end, as a busy database would.
DIRTY = "kubenova-dirty"
#: "kubenova-dhcp eth0 <ip>/<prefix>": eth0 has (bound) or kept (renew) a DHCP lease; the address goes next
#: to the link-local GUEST_ADDRESS, which stays, and the lease's router becomes the default route.
DHCP = "kubenova-dhcp"
#: Every guest with an eth0 serves "kubenova-http <mac of eth0>" at / on HTTP_PORT (busybox httpd), and
#: "kubenova-tcp <mac of eth0>" on TCP_PORT to every connection, then closes it: a client sees which VM
#: answered.
HTTP, HTTP_PORT = "kubenova-http", 80
TCP, TCP_PORT = "kubenova-tcp", 7000
#: "kubenova-probe ok <first line of the body>" or "kubenova-probe fail": one line per attempt, an attempt
#: a second (1 s timeout) to GET http://<ip>:<port>/ (kubenova.probe=<ip>:<port>) once the guest has a DHCP
#: lease.
PROBE = "kubenova-probe"
GUEST_ADDRESS = "169.254.10.2/16"
PEER_ADDRESS = "169.254.10.1"
#: Where the initramfs holds DHCP_SCRIPT, and where that script keeps each interface's leased address.
DHCP_SCRIPT_PATH = "/etc/kubenova/dhcp.sh"
LEASES = "/run/kubenova-dhcp"

INIT = f"""#!/bin/busybox sh
# The kubenova test guest. Every line on stdout goes to the serial console (ttyS0).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for module in $(cat /lib/modules/order); do
  insmod "/lib/modules/$module.ko"
done

role=guest
write_dev=
write_pattern=
fill_dev=
timed_devs=
timed_mib=
spoof_mac=
dirty_mib=
probe=
shell=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kubenova.role=rescue) role=rescue ;;
    kubenova.spoof=*) spoof_mac=${{arg#kubenova.spoof=}} ;;
    kubenova.dirty=*) dirty_mib=${{arg#kubenova.dirty=}} ;;
    kubenova.fill=*) fill_dev=${{arg#kubenova.fill=}} ;;
    kubenova.timed=*:*)
      spec=${{arg#kubenova.timed=}}
      timed_devs=$(echo "${{spec%%:*}}" | tr , ' ')
      timed_mib=${{spec#*:}} ;;
    kubenova.probe=*) probe=${{arg#kubenova.probe=}} ;;
    kubenova.shell=console) shell=console ;;
    kubenova.write=*:*)
      spec=${{arg#kubenova.write=}}
      write_dev=${{spec%%:*}}
      write_pattern=${{spec#*:}} ;;
  esac
done
case "$write_dev" in ''|*[!a-z0-9]*) write_dev= ;; esac
case "$write_pattern" in ''|*[!A-Za-z0-9-]*) write_dev= ;; esac
case "$spoof_mac" in ''|*[!0-9a-f:]*) spoof_mac= ;; esac
case "$dirty_mib" in ''|*[!0-9]*) dirty_mib= ;; esac
case "$fill_dev" in ''|*[!a-z0-9]*) fill_dev= ;; esac
case "$timed_devs" in *[!a-z0-9' ']*) timed_devs= ;; esac
case "$timed_mib" in ''|*[!0-9]*) timed_devs= ;; esac
case "$probe" in *[!0-9.:]*) probe= ;; [0-9]*.*.*.*:[0-9]*) ;; *) probe= ;; esac

if [ "$role" = rescue ]; then
  echo "{RESCUE_MARKER} kernel=$(uname -r)"
else
  echo "{BOOT_MARKER} kernel=$(uname -r)"
fi
memtotal=$(awk '/^MemTotal/ {{print $2}}' /proc/meminfo)
echo "{SIZE} cpus=$(grep -c ^processor /proc/cpuinfo) memtotal-kib=$memtotal"
if [ "$shell" = console ]; then
  # A shell on the serial console (kubenova.shell=console), as a login prompt would give: what a user
  # types through `kubectl kubenova console` runs, and its answer comes back the same way.
  (while true; do setsid sh -i </dev/ttyS0 >/dev/ttyS0 2>&1; done) &
fi

for dev in $(ls /sys/block | grep -E '^(vd|sd)' | sort); do
  head=$(od -A n -t x1 -N 16 -v "/dev/$dev" | tr -d ' \\n')
  echo "{DISK} $dev sectors=$(cat "/sys/block/$dev/size") head=$head"
done

# The config drive: an ISO9660 filesystem labelled cidata (NoCloud) or config-2 (OpenStack).
for dev in $(ls /sys/block | grep -E '^(vd|sd|sr)' | sort); do
  [ "$(dd if="/dev/$dev" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || continue
  label=$(dd if="/dev/$dev" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' ')
  case "$label" in cidata|CIDATA|config-2|CONFIG-2) ;; *) continue ;; esac
  mkdir -p /mnt/config
  mount -t iso9660 -o ro "/dev/$dev" /mnt/config || continue
  cd /mnt/config
  find . -type f | sort | while read -r file; do
    echo "{CD_FILE} ${{file#./}} $(base64 -w 0 "$file")"
  done
  cd /
  umount /mnt/config
  break
done

ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  ip addr add {GUEST_ADDRESS} dev eth0
  echo "{NET} eth0 up"
  if [ -n "$spoof_mac" ]; then
    ping -c 3 -W 1 {PEER_ADDRESS} >/dev/null 2>&1
    ip link set eth0 down
    ip link set eth0 address "$spoof_mac"
    ip link set eth0 up
    echo "{SPOOFING} eth0 $spoof_mac"
    ping -c 5 -W 1 {PEER_ADDRESS} >/dev/null 2>&1
    echo "{SPOOFED} eth0"
  else
    ping -c 5 -W 1 {PEER_ADDRESS} >/dev/null 2>&1 &
  fi
  # Its own traffic, from here on with its final MAC (a spoofing guest has changed it by now): the two
  # servers name it, so a client knows which VM answered.
  mac=$(cat /sys/class/net/eth0/address)
  mkdir -p /www {LEASES}
  echo "{HTTP} $mac" >/www/index.html
  echo "{TCP} $mac" >/run/kubenova-tcp
  httpd -p {HTTP_PORT} -h /www
  nc -ll -p {TCP_PORT} -e /bin/cat /run/kubenova-tcp 2>/dev/null &
  # DHCP next to the static address: in the foreground of a background job (-f), so it never blocks the
  # boot, retries without end (3 discovers a second apart, then 5 s) and runs DHCP_SCRIPT with our stdout,
  # the console; its own chatter (stderr) is dropped. Without -f it would daemonize and lose the console.
  udhcpc -f -i eth0 -s {DHCP_SCRIPT_PATH} -T 1 -t 3 -A 5 2>/dev/null &
  if [ -n "$probe" ]; then
    (
      until [ -s {LEASES}/eth0 ]; do sleep 1; done
      # Debian's static busybox has no wget -T (it crashes on it): timeout bounds each attempt to 1 s. The
      # subshell's stderr is dropped, or the shell would print "Terminated" for every wget timeout killed.
      while true; do
        sleep 1 &
        if body=$(timeout 1 wget -q -O - "http://$probe/" 2>/dev/null); then
          echo "{PROBE} ok $(printf '%s\\n' "$body" | head -n 1 | tr -d '\\r')"
        else
          echo "{PROBE} fail"
        fi
        wait $!
      done
    ) 2>/dev/null &
  fi
fi

# Memory that never settles: a file on the initramfs's RAM filesystem, read and written back in place
# without end, so a live migration's pre-copy finds its pages dirty again at every pass. Random bytes, not
# zeros: QEMU sends a zero page as a few bytes however often it is written.
if [ -n "$dirty_mib" ]; then
  dd if=/dev/urandom of=/dirty-seed bs=1048576 count=1 2>/dev/null
  n=0
  while [ "$n" -lt "$dirty_mib" ]; do
    dd if=/dirty-seed of=/dirty bs=1048576 seek="$n" conv=notrunc 2>/dev/null
    n=$((n + 1))
  done
  rm -f /dirty-seed
  echo "{DIRTY} $dirty_mib"
  while true; do dd if=/dirty of=/dirty bs=1048576 conv=notrunc 2>/dev/null; done &
fi

# Hot-plugged disks appear later (PCI hotplug, devtmpfs makes the node): poll every tick.
written=
filled=0
i=0
while true; do
  # The fill hook: one more MiB of the disk every tick, straight to it (no page cache), until a write fails
  # at its end. A full host file system pauses the guest inside the write, which goes on once it runs again.
  if [ -n "$fill_dev" ] && [ -b "/dev/$fill_dev" ]; then
    if tr '\\000' K </dev/zero \\
        | dd of="/dev/$fill_dev" bs=1M count=1 seek=$filled iflag=fullblock oflag=direct 2>/dev/null; then
      filled=$((filled + 1))
      echo "{FILLED} $fill_dev $filled"
    else
      fill_dev=
    fi
  fi
  # The timed-write hook: once every device is there, each in turn, timed by the guest's own clock.
  if [ -n "$timed_devs" ] && [ -z "$timed" ]; then
    ready=1
    for dev in $timed_devs; do [ -b "/dev/$dev" ] || ready=; done
    if [ -n "$ready" ]; then
      for dev in $timed_devs; do
        start=$(cut -d' ' -f1 /proc/uptime)
        dd if=/dev/zero of="/dev/$dev" bs=1M count="$timed_mib" oflag=direct 2>/dev/null
        echo "{TIMED} $dev $timed_mib $start $(cut -d' ' -f1 /proc/uptime)"
      done
      timed=1
    fi
  fi
  if [ -n "$write_dev" ] && [ -z "$written" ] && [ -b "/dev/$write_dev" ]; then
    printf '%s' "$write_pattern" | dd of="/dev/$write_dev" bs=512 conv=notrunc,fsync 2>/dev/null \\
      && sync && echo "{WROTE} $write_dev $write_pattern"
    written=1
  fi
  if [ -e /sys/class/net/eth0 ] && [ $((i % {MAC_EVERY})) = 0 ]; then
    echo "{MAC} eth0 $(cat /sys/class/net/eth0/address)"
  fi
  echo "{TICK} $i"
  i=$((i + 1))
  sleep 1
done
"""

#: udhcpc's hook (-s): busybox's own default script would flush eth0 on deconfig, and with it the link-local
#: address the existing tests use; this one only adds and removes the leased address.
DHCP_SCRIPT = f"""#!/bin/sh
# The kubenova test guest's DHCP hook: $1 is udhcpc's event, the lease comes in $interface, $ip, $mask
# (prefix length), $router. stdout is udhcpc's, which /init left on the console.
lease="{LEASES}/$interface"
old=$(cat "$lease" 2>/dev/null)
case "$1" in
  bound|renew)
    address="$ip/${{mask:-32}}"
    if [ -n "$old" ] && [ "$old" != "$address" ]; then
      ip addr del "$old" dev "$interface"
    fi
    ip addr replace "$address" dev "$interface"
    for gateway in $router; do
      ip route replace default via "$gateway" dev "$interface"
      break
    done
    echo "$address" >"$lease"
    echo "{DHCP} $interface $address"
    ;;
  deconfig)
    if [ -n "$old" ]; then
      ip addr del "$old" dev "$interface"
      rm -f "$lease"
    fi
    ;;
esac
exit 0
"""
