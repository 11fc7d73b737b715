// kube-network-policies (sigs.k8s.io/kube-network-policies) as a process of the local cluster.
//
// Upstream's cmd/main.go only runs inside a pod (rest.InClusterConfig reads a ServiceAccount token at a fixed
// path). This is the same program with what a host process of `dev/cluster up` needs instead:
//
//   - --kubeconfig: the cluster's client certificate for the user system:kube-network-policies.
//   - SIGTERM is handled like SIGINT, so that `dev/cluster down` (which stops processes with SIGTERM) lets
//     the controller delete its nftables table. Upstream only catches SIGINT and dies with its rules in
//     place, leaving the pods behind NetworkPolicies queued to a queue nobody reads (dropped).
//   - --cleanup deletes the tables and exits (what `down` runs afterwards, like `kube-proxy --cleanup`).
//   - On a kernel without nftables' queue statement, the rules that send packets to the evaluator are
//     written with the xtables NFQUEUE target instead (divert.go).
//
// AdminNetworkPolicy and BaselineAdminNetworkPolicy (alpha CRDs) are left out: NetworkPolicy only.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"time"

	"github.com/google/nftables"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/component-base/logs"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"
	"sigs.k8s.io/kube-network-policies/pkg/networkpolicy"
)

// The table name upstream's Config.Defaults() picks (divert.go uses it too); --cleanup deletes both families.
const tableName = "kube-network-policies"

var (
	kubeconfig          string
	failOpen            bool
	queueID             int
	metricsBindAddress  string
	hostnameOverride    string
	netfilterBug1766Fix bool
	cleanup             bool
)

func init() {
	flag.StringVar(&kubeconfig, "kubeconfig", "", "Path to the kubeconfig to reach the API server with (required)")
	flag.BoolVar(&failOpen, "fail-open", false, "If set, don't drop packets if the controller is not running")
	flag.IntVar(&queueID, "nfqueue-id", 100, "Number of the nfqueue used")
	flag.StringVar(&metricsBindAddress, "metrics-bind-address", "127.0.0.1:9080", "The IP address and port for the metrics server to serve on")
	flag.StringVar(&hostnameOverride, "hostname-override", "", "The name of the Node whose pods this process enforces policies for (required)")
	flag.BoolVar(&netfilterBug1766Fix, "netfilter-bug-1766-fix", true, "If set, process DNS packets on the PREROUTING hooks to avoid the race condition on the conntrack subsystem, not needed for kernels 6.12+")
	flag.BoolVar(&cleanup, "cleanup", false, "Delete the nftables tables inet and ip "+tableName+" and exit")
}

func main() {
	os.Exit(run())
}

func deleteTable() error {
	nft, err := nftables.New()
	if err != nil {
		return err
	}
	// Upstream's (inet) and divert.go's (ip). Add then delete: no error when a table is not there.
	for _, family := range []nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyIPv4} {
		table := &nftables.Table{Name: tableName, Family: family}
		nft.AddTable(table)
		nft.DelTable(table)
	}
	return nft.Flush()
}

func run() int {
	c := logsapi.NewLoggingConfiguration()
	logsapi.AddGoFlags(c, flag.CommandLine)
	flag.Parse()
	if cleanup {
		if err := deleteTable(); err != nil {
			fmt.Fprintf(os.Stderr, "deleting the nftables tables %s: %v\n", tableName, err)
			return 1
		}
		return 0
	}
	if kubeconfig == "" || hostnameOverride == "" {
		fmt.Fprintln(os.Stderr, "--kubeconfig and --hostname-override are required")
		return 2
	}
	// Decided before logging starts: without the queue statement, upstream's failing rule sync is quietened
	// (its logger takes os.Stderr when it is set up).
	native := nativeQueueSupported()
	if !native {
		defer quietUpstreamSyncErrors()()
	}
	logs.InitLogs()
	if err := logsapi.ValidateAndApply(c, nil); err != nil {
		fmt.Fprintf(os.Stderr, "%v\n", err)
		return 1
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, unix.SIGTERM)
	defer cancel()
	logger := klog.FromContext(ctx)
	flag.VisitAll(func(f *flag.Flag) { logger.Info("flag", "name", f.Name, "value", f.Value) })

	// The metrics address doubles as a lock: a second instance (another `up` racing this one) must not share
	// the queue or rewrite and delete this one's table. Upstream only logs a failed listen.
	listener, err := net.Listen("tcp", metricsBindAddress)
	if err != nil {
		logger.Error(err, "can not listen on the metrics address; is another kube-network-policies running?")
		return 1
	}
	http.Handle("/metrics", promhttp.Handler())
	go func() {
		utilruntime.HandleError(http.Serve(listener, nil))
	}()

	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		logger.Error(err, "loading kubeconfig", "path", kubeconfig)
		return 1
	}
	config.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	config.ContentType = "application/vnd.kubernetes.protobuf"
	clientset, err := kubernetes.NewForConfig(config)
	if err != nil {
		logger.Error(err, "creating the client")
		return 1
	}
	informersFactory := informers.NewSharedInformerFactory(clientset, 0)

	controller, err := networkpolicy.NewController(
		clientset,
		informersFactory.Networking().V1().NetworkPolicies(),
		informersFactory.Core().V1().Namespaces(),
		informersFactory.Core().V1().Pods(),
		nil, nil, nil, nil,
		networkpolicy.Config{
			FailOpen:            failOpen,
			QueueID:             queueID,
			NodeName:            hostnameOverride,
			NetfilterBug1766Fix: netfilterBug1766Fix,
			NFTableName:         tableName,
		},
	)
	if err != nil {
		logger.Error(err, "Can not start network policy controller")
		return 1
	}
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	diverted := make(chan struct{})
	if native {
		close(diverted) // upstream's own rules do it
	} else {
		logger.Info("this kernel has no nftables queue statement (CONFIG_NFT_QUEUE); diverting packets with the xtables NFQUEUE target instead")
		go func() {
			defer close(diverted)
			runDiversion(runCtx, informersFactory, hostnameOverride, uint16(queueID), failOpen)
		}()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Run removes its nftables table when the context ends.
		utilruntime.HandleError(controller.Run(runCtx))
	}()
	informersFactory.Start(runCtx.Done())

	status := 0
	select {
	case <-ctx.Done():
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
	case <-done:
		// E.g. the queue could not be opened: nobody would read what the rules divert to it.
		logger.Error(nil, "the controller stopped; removing the rules and exiting")
		status = 1
	}
	stopRun()
	<-diverted
	// Whatever Run managed to do, leave no table behind.
	if err := deleteTable(); err != nil {
		logger.Error(err, "deleting the nftables table")
		return 1
	}
	return status
}
