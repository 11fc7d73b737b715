package main

// The kernel side of kube-network-policies on kernels without nftables' queue expression.
//
// Upstream sends the packets to its userspace evaluator with nftables' native `queue` statement, which needs
// CONFIG_NFT_QUEUE. The local cluster's kernel has netfilter queueing (nfnetlink_queue) and the xtables
// NFQUEUE target, but not that expression: the whole nftables batch of upstream's rule sync is refused
// with ENOENT and no packet ever reaches the evaluator. Here the same rules are written with the NFQUEUE
// target through nft_compat (what iptables-nft does for `-j NFQUEUE`), for IPv4 (this cluster has no IPv6),
// in the table `ip kube-network-policies` (upstream's is `inet kube-network-policies`); upstream's
// controller still evaluates every queued packet. Its own rule sync keeps failing atomically (it logs
// "syncing nftables rules" with "no such file or directory") and changes nothing.

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

const (
	probeTable = "kube-network-policies-probe"
	podIPsSet  = "podips-v4"
	// xt_NFQUEUE.h: NFQ_FLAG_BYPASS, accept (instead of drop) when no process listens on the queue.
	nfqFlagBypass = 0x01
)

// nativeQueueSupported tells whether the kernel takes nftables' `queue` statement (CONFIG_NFT_QUEUE).
func nativeQueueSupported() bool {
	nft, err := nftables.New()
	if err != nil {
		return false
	}
	table := nft.AddTable(&nftables.Table{Name: probeTable, Family: nftables.TableFamilyINet})
	chain := nft.AddChain(&nftables.Chain{Name: "probe", Table: table})
	nft.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: []expr.Any{&expr.Queue{Num: 65535}}})
	ok := nft.Flush() == nil
	nft.DelTable(table)
	_ = nft.Flush()
	return ok
}

// nfqueueTarget is the xtables NFQUEUE target, revision 3: struct xt_NFQ_info_v3 {u16 queuenum, queues_total,
// flags}, padded to 8 bytes, in host byte order.
func nfqueueTarget(queue uint16, failOpen bool) *expr.Target {
	info := make([]byte, 8)
	binary.NativeEndian.PutUint16(info[0:], queue)
	binary.NativeEndian.PutUint16(info[2:], 1)
	if failOpen {
		binary.NativeEndian.PutUint16(info[4:], nfqFlagBypass)
	}
	unknown := xt.Unknown(info)
	return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &unknown}
}

// syncDiversion replaces the table with upstream's rules for IPv4: in POSTROUTING,
// before SNAT, let through what the node's root user sends and established connections; send the rest to or
// from the local pods that a NetworkPolicy selects to the queue.
func syncDiversion(ips []netip.Addr, queue uint16, failOpen bool) error {
	nft, err := nftables.New()
	if err != nil {
		return err
	}
	table := &nftables.Table{Name: tableName, Family: nftables.TableFamilyIPv4}
	nft.AddTable(table)
	nft.DelTable(table)
	nft.AddTable(table)
	set := &nftables.Set{Table: table, Name: podIPsSet, KeyType: nftables.TypeIPAddr}
	elements := make([]nftables.SetElement, 0, len(ips))
	for _, ip := range ips {
		elements = append(elements, nftables.SetElement{Key: ip.AsSlice()})
	}
	if err := nft.AddSet(set, elements); err != nil {
		return fmt.Errorf("adding set %s: %w", podIPsSet, err)
	}
	chain := nft.AddChain(&nftables.Chain{
		Name:     "postrouting",
		Table:    table,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityNATSource - 5),
	})
	rules := [][]expr.Any{
		// meta skuid 0 accept: the node's own root processes (kubelet probes, the host's tools) are not policed.
		{
			&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 0, 0, 0}},
			&expr.Verdict{Kind: expr.VerdictAccept},
		},
		// ct state established,related accept: only the first packet of a connection is evaluated.
		{
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{
				SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
				Xor:  []byte{0, 0, 0, 0},
			},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
			&expr.Verdict{Kind: expr.VerdictAccept},
		},
	}
	for _, offset := range []uint32{12, 16} { // ip saddr, ip daddr @podips-v4 -> NFQUEUE
		rules = append(rules, []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: podIPsSet},
			nfqueueTarget(queue, failOpen),
		})
	}
	for _, exprs := range rules {
		nft.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: exprs})
	}
	return nft.Flush()
}

// policedPodIPs are the IPv4 addresses of this node's pods that at least one NetworkPolicy selects (what
// upstream puts in the same set).
func policedPodIPs(factory informers.SharedInformerFactory, nodeName string) ([]netip.Addr, error) {
	policies, err := factory.Networking().V1().NetworkPolicies().Lister().List(labels.Everything())
	if err != nil {
		return nil, err
	}
	pods := factory.Core().V1().Pods().Lister()
	var ips []netip.Addr
	for _, policy := range policies {
		selector, err := metav1.LabelSelectorAsSelector(&policy.Spec.PodSelector)
		if err != nil {
			continue
		}
		selected, err := pods.Pods(policy.Namespace).List(selector)
		if err != nil {
			return nil, err
		}
		for _, pod := range selected {
			// A host-network pod has the node's address: policies do not apply to it, and queueing the node's
			// address would police all the node's traffic.
			if pod.Spec.NodeName != nodeName || pod.Spec.HostNetwork {
				continue
			}
			for _, podIP := range pod.Status.PodIPs {
				if addr, err := netip.ParseAddr(podIP.IP); err == nil && addr.Is4() {
					ips = append(ips, addr)
				}
			}
		}
	}
	slices.SortFunc(ips, func(a, b netip.Addr) int { return a.Compare(b) })
	return slices.Compact(ips), nil
}

// runDiversion keeps the table in step with the policies and pods: on every change of either (coalesced), and
// every 30 s. It returns when ctx ends; the caller deletes the table.
func runDiversion(ctx context.Context, factory informers.SharedInformerFactory, nodeName string, queue uint16, failOpen bool) {
	logger := klog.FromContext(ctx).WithName("diversion")
	changed := make(chan struct{}, 1)
	poke := func(any) {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    poke,
		UpdateFunc: func(_, obj any) { poke(obj) },
		DeleteFunc: poke,
	}
	_, _ = factory.Core().V1().Pods().Informer().AddEventHandler(handler)
	_, _ = factory.Networking().V1().NetworkPolicies().Informer().AddEventHandler(handler)
	factory.WaitForCacheSync(ctx.Done())
	var last []netip.Addr
	synced := false
	ticker := time.NewTicker(30 * time.Second)
	defer ticker.Stop()
	for {
		ips, err := policedPodIPs(factory, nodeName)
		if err == nil && (!synced || !slices.Equal(ips, last)) {
			if err = syncDiversion(ips, queue, failOpen); err == nil {
				logger.Info("diverted the pods behind NetworkPolicies to the queue", "addresses", len(ips), "queue", queue)
				last, synced = ips, true
			}
		}
		if err != nil {
			logger.Error(err, "syncing the nftables table")
			synced = false
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-ticker.C:
			synced = false // rewrite it anyway: someone may have flushed it
		}
	}
}

// quietUpstreamSyncErrors passes what the process writes to stderr through a filter until the returned
// function is called: upstream's rule sync fails at every pod or policy change (and up to five retries each)
// with a multi-line "netlink receive: no such file or directory" error that says nothing new and would fill
// the log. The first one is kept, with a note; later ones are dropped. Everything else passes unchanged.
func quietUpstreamSyncErrors() (restore func()) {
	original := os.Stderr
	reader, writer, err := os.Pipe()
	if err != nil {
		return func() {}
	}
	os.Stderr = writer
	done := make(chan struct{})
	go func() {
		defer close(done)
		filterLogEntries(reader, original)
	}()
	return func() {
		os.Stderr = original
		_ = writer.Close()
		<-done
	}
}

// filterLogEntries copies klog's text entries (a header line; a value written as `key=<` continues on the
// following lines up to one that starts with " >") from r to out, dropping upstream's failed rule syncs
// (after the first).
func filterLogEntries(r io.Reader, out io.Writer) {
	scanner := bufio.NewScanner(r)
	scanner.Buffer(make([]byte, 64*1024), 1024*1024)
	var entry []string
	open, dropped, syncs := false, 0, 0
	flush := func() {
		if len(entry) == 0 {
			return
		}
		text := strings.Join(entry, "\n") + "\n"
		entry = entry[:0]
		if strings.Contains(text, " controller.go:") {
			if strings.Contains(text, `] "Syncing nftables rules"`) && syncs > 0 {
				return // the attempt itself, logged before each failure
			}
			if strings.Contains(text, `] "Syncing nftables rules"`) {
				syncs++
			}
			if strings.Contains(text, "netlink receive: no such file or directory") ||
				strings.Contains(text, "Dropping out of the queue") {
				dropped++
				if dropped > 1 {
					return
				}
				text += "(flownexus) upstream's own nftables rule sync fails on this kernel, as expected without " +
					"the nftables queue statement; divert.go writes the rules instead. Later attempts and their " +
					"errors are not logged.\n"
			}
		}
		_, _ = io.WriteString(out, text)
	}
	for scanner.Scan() {
		line := scanner.Text()
		if !open {
			flush()
		}
		entry = append(entry, line)
		if strings.HasSuffix(line, "=<") {
			open = true
			continue
		}
		if open && strings.HasPrefix(line, " >") {
			open = false
		}
		if !open {
			flush()
		}
	}
	flush()
}
