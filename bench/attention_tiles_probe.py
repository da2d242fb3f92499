"""The prototype behind docs/performance.md, "Round four" (training tokens/s against x-transformers): causal
attention by query blocks of ``bq`` rows against their key prefix with ``bmm``, the softmax probabilities
kept for the backward ("s") or recomputed from the log-sum-exps ("r"), forward + backward against
``scaled_dot_product_attention(is_causal=True)`` (CPU flash kernel). Not used by posemb (it keeps (L, L/2)
probabilities per head, and wins only at some shapes):
    .venv/bin/python bench/attention_tiles_probe.py THREADS
Prints the median ms of each variant per (batch, heads, L, d)."""
import torch, time, torch.nn.functional as F, sys
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
class TileAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bq, save):
        B,H,L,d = q.shape; BH=B*H; scale=d**-0.5
        q3=q.reshape(BH,L,d); k3=k.reshape(BH,L,d); v3=v.reshape(BH,L,d)
        out=torch.empty_like(q3); lse=torch.empty(BH,L,dtype=q.dtype)
        neg=q.new_full((bq,bq),float('-inf')).triu(1)
        Ps=[]
        for s in range(0,L,bq):
            e=min(s+bq,L)
            S=torch.baddbmm(q3.new_zeros(()), q3[:,s:e], k3[:,:e].transpose(1,2), beta=0, alpha=scale)
            S[:,:,s:e]+=neg[:e-s,:e-s]
            if save:
                P=torch.softmax(S,-1); Ps.append(P)
            else:
                m=torch.logsumexp(S,-1,keepdim=True); lse[:,s:e]=m[...,0]
                P=S.sub_(m).exp_()
            torch.bmm(P, v3[:,:e], out=out[:,s:e])
        ctx.save_for_backward(q3,k3,v3,out,lse,*Ps); ctx.bq=bq; ctx.shape=q.shape; ctx.save=save
        return out.view(q.shape)
    @staticmethod
    def backward(ctx, g):
        q3,k3,v3,out,lse,*Ps=ctx.saved_tensors; bq=ctx.bq; B,H,L,d=ctx.shape; scale=d**-0.5
        g3=g.reshape(out.shape)
        dq=torch.empty_like(q3); dk=torch.zeros_like(k3); dv=torch.zeros_like(v3)
        delta=(g3*out).sum(-1,keepdim=True)
        neg=q3.new_full((bq,bq),float('-inf')).triu(1)
        for i,s in enumerate(range(0,L,bq)):
            e=min(s+bq,L)
            if ctx.save: P=Ps[i]
            else:
                P=torch.baddbmm(q3.new_zeros(()), q3[:,s:e], k3[:,:e].transpose(1,2), beta=0, alpha=scale)
                P[:,:,s:e]+=neg[:e-s,:e-s]
                P.sub_(lse[:,s:e,None]).exp_()
            dv[:,:e].baddbmm_(P.transpose(1,2), g3[:,s:e])
            dP=torch.bmm(g3[:,s:e], v3[:,:e].transpose(1,2))
            dP.sub_(delta[:,s:e]).mul_(P)
            torch.baddbmm(q3.new_zeros(()), dP, k3[:,:e], beta=0, alpha=scale, out=dq[:,s:e])
            dk[:,:e].baddbmm_(dP.transpose(1,2), q3[:,s:e], alpha=scale)
        sh=ctx.shape
        return dq.view(sh), dk.view(sh), dv.view(sh), None, None
def tm(f,n=7):
    for _ in range(2): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[n//2]*1e3
for shape in [(8,4,512,64),(1,4,2048,64),(32,4,128,32),(1,4,4096,64)]:
    q,k,v=(torch.randn(*shape,requires_grad=True) for _ in range(3)); g=torch.randn(*shape)
    res=[f"flash {tm(lambda: F.scaled_dot_product_attention(q,k,v,is_causal=True).backward(g)):.1f}"]
    for bq in (64,128,256):
        for save in (True,False):
            res.append(f"b{bq}{'s' if save else 'r'} {tm(lambda: TileAttn.apply(q,k,v,bq,save).backward(g)):.1f}")
    print(shape, " ".join(res), flush=True)
